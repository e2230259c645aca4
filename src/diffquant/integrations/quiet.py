"""diffusers' and transformers' load-time chatter, silenced while diffquant loads a model.

Its own module, importing nothing of diffquant: the built-in pipeline's loader (``models``) and the
diffusers integration both use it.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_loading():
    """diffusers' and transformers' load-time chatter off inside the block: advice printed on every load
    (install accelerate; install torchvision for image processors no diffusion pipeline here uses;
    ``torch_dtype`` renamed), and their progress bars over a load of a second. Errors still print;
    everything is restored after."""
    import warnings

    libraries = []
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            libraries.append(__import__(f"{name}.utils.logging", fromlist=["logging"]))
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"diffusers(\.|$)")
            yield
    finally:
        for lib, (verbosity, bar) in zip(libraries, saved, strict=True):
            lib.set_verbosity(verbosity)
            if bar:
                lib.enable_progress_bar()
