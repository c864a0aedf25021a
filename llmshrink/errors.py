"""User-facing errors: one clear line, no traceback, exit code 2."""


class LlmshrinkError(Exception):
    """Bad input (recipe, file, shape, unsupported model). The CLI prints str(err) and exits 2."""


class RecipeError(LlmshrinkError):
    """A recipe field is wrong: the message names file, field, value and what is allowed."""

    def __init__(self, file: str, field: str, message: str):
        self.file, self.field = file, field
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {message}")


def did_you_mean(name: str, known, prefix: str = "") -> str:
    """' (did you mean PREFIXmatch?)' for the closest known name, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.4)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def first_line(err: BaseException, *, with_type: bool = True) -> str:
    """An exception in one line: its first non-blank line, after its type name unless `with_type` is False."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0]}" if with_type else lines[0]
