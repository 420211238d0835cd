"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class EffcError(Exception):
    """Bad input or an impossible request: one line saying what was wrong and what to do."""


class CaptureError(EffcError):
    """torch.export could not capture the model."""


class VerificationError(EffcError):
    """The compiled artifact does not match eager PyTorch within tolerance."""
