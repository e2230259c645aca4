"""Integrations with model libraries. The core never imports these; :func:`diffquant.quantize`
loads one when the model holds modules from that library."""


def uses_diffusers(model) -> bool:
    """Whether any submodule of ``model`` is a diffusers class (checked without importing diffusers)."""
    return any(type(m).__module__.startswith("diffusers.") for m in model.modules())
