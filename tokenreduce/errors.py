"""The one exception type users see.

Every refusal in tokenreduce (unsupported model, impossible setting, failed verification) raises
`TokenReduceError` with a message that says what was looked for or what to change, so callers (and the
command line) can print one line and exit instead of a traceback.

Structured fields let callers act on an error without parsing its text: `setting` names the settings field
(or keyword argument, e.g. `trust_pickle`) at fault, e.g. "keep_ratio" (the command line maps it to its
flag, `--keep-ratio`); `hint` is the change that fixes it, written as Python keyword assignments of such
names with alternatives joined by `" or "` (`"clamp_r=True"`, `"protected_tokens=1 or method='tome'"`), so
a front end can show it in its own spelling. `str(exc)` is always the full message on its own; both fields
are optional and repeat what the message says.
"""

from __future__ import annotations


class TokenReduceError(RuntimeError):
    """A model or setting tokenreduce cannot handle, with the reason and the fix in the message.

    Args:
        message: the full text a user reads (what was found, what is allowed, what to change).
        setting: the settings field or keyword argument at fault, e.g. `"keep_ratio"`; None when no single
            one is.
        hint: the fix as keyword assignments, e.g. `"clamp_r=True"`; alternatives joined by `" or "`. None
            when the fix is not a change of settings or arguments.
    """

    def __init__(self, message: str, *, setting: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.setting = setting
        self.hint = hint
