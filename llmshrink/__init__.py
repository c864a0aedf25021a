"""llmshrink: make small language models smaller and faster, and prove it with numbers."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Rebuild a compressed checkpoint from its manifest and load its weights strictly."""
    from llmshrink.checkpoint import load_checkpoint

    return load_checkpoint(path, device=device)
