"""Keep library progress bars out of service logs (a worker log is not a terminal)."""
from __future__ import annotations


def silence_library_progress() -> None:
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
