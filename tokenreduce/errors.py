"""The one exception type users see.

Every refusal in tokenreduce (unsupported model, impossible setting, failed verification) raises
`TokenReduceError` with a message that says what was looked for or what to change, so callers (and the
command line) can print one line and exit instead of a traceback.
"""


class TokenReduceError(RuntimeError):
    """A model or setting tokenreduce cannot handle, with the reason and the fix in the message."""
