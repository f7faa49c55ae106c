"""The one exception type users see.

Every refusal in tokenreduce (unsupported model, impossible setting, failed verification) raises
`TokenReduceError` with a message that says what was looked for or what to change, so callers (and the
command line) can print one line and exit instead of a traceback.

Structured fields let callers act on an error without parsing its text: `setting` names the settings field
at fault (e.g. "keep_ratio"; the command line maps it to its flag, `--keep-ratio`), `hint` says what to
change where the message alone does not.
"""

from __future__ import annotations


class TokenReduceError(RuntimeError):
    """A model or setting tokenreduce cannot handle, with the reason and the fix in the message."""

    def __init__(self, message: str, *, setting: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.setting = setting
        self.hint = hint
