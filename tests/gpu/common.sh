# Sourced by the device scripts: wheels the GPU image lacks, the lmcompress.* layout, an `lmc` function.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.bnb:$PWD PYTHONUNBUFFERED=1
for d in turbo calib cli; do ln -sfn ../$d lmcompress/$d; done
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -c "from lmcompress.cli.main import cli; cli()" "$@"\n' > /tmp/bin/lmc
chmod +x /tmp/bin/lmc && export PATH=/tmp/bin:$PATH
# A Llama-2-7B config with the reference tokenizer: what `--dummy` runs need (weights are made on the GPU).
make_l7_config() {
  mkdir -p /tmp/l7cfg && cp tests/assets/ref-llama/{tokenizer.json,tokenizer_config.json,chat_template.jinja} /tmp/l7cfg/
  python3 -c "import json; from lmcompress.reference.dummy import LLAMA2_7B; json.dump(LLAMA2_7B, open('/tmp/l7cfg/config.json','w'))"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/device.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/device.txt
date -u | tee -a $OUT/device.txt
