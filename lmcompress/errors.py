"""User-facing errors: one line naming the problem and the fix."""


class LmcError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2.

    The message must say what is wrong and how to fix it, e.g.
    "group size 96 does not divide in_features 4096 of model.layers.0.mlp.down_proj;
    use --group-size 32, 64 or 128".
    """
