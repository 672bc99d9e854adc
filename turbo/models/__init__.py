"""lmcompress.turbo.models: the decoder forward pass of the supported families (Llama, Mistral, Qwen2, Qwen3)."""
