"""One installer per edit kind: how each kind reaches a transformers model.

An installer is a function ``install(runtime, edit)`` registered for one or more edit classes with
:func:`installer`; it hooks, wraps or tags what the adapter resolves the edit's site to, through the
runtime's helpers (`steer.backends.transformers.runtime.Runtime`), so that uninstalling is the runtime's
job. ``rank`` orders kinds that share a place (e.g. the language model's inputs): pruning, then positions,
then input edits, then auxiliary runs, then everything else, each in apply order. An optional
``check(adapter, edit)`` runs at ``steer.apply`` time, before anything is installed.

Adding a kind = one new module here that registers its installer (and an import below).
"""

from steer.backends.transformers.installers import (  # noqa: F401  (each module registers its installer)
    attention,
    decoding,
    escape,
    inputs,
    logits,
    positions,
    prune,
    scores,
    source_run,
    tensor_sites,
)
from steer.backends.transformers.installers.registry import (
    INSTALLERS,
    Installer,
    check,
    install,
    installer,
    installer_for,
    ordered,
)

__all__ = ["INSTALLERS", "Installer", "check", "install", "installer", "installer_for", "ordered"]
