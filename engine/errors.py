"""User-facing errors: one line naming the problem and the fix."""


class HeadSurgeonError(Exception):
    """An error caused by the user's input or environment; printed as one line, never as a traceback."""


class UnsupportedModelError(HeadSurgeonError):
    """The model is not an ALiBi architecture this tool knows how to operate on."""


class ModelLoadError(HeadSurgeonError):
    """The model or tokenizer could not be loaded (missing path, no network, corrupt files)."""


class InputError(HeadSurgeonError):
    """A prompts file, corpus, spec or setting given by the user is malformed."""
