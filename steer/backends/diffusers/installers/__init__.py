"""One installer per pipeline edit kind: how each kind reaches a pipeline.

An installer is ``install(runtime, handle, edit)`` registered for one edit class with :func:`installer`; it
registers the edit with what the runtime owns (the layers' processors, the handle's pipeline), so that
uninstalling is the runtime's job. An optional ``check(adapter, edit)`` runs at ``steer.apply`` time, before
anything is installed. Adding a kind = one new module here that registers its installer (and an import below).
"""

from steer.backends.diffusers.installers import latent, processor  # noqa: F401  (each registers its installer)
from steer.backends.diffusers.installers.registry import (
    INSTALLERS,
    Installer,
    check,
    install,
    installer,
    installer_for,
    ordered,
)

__all__ = ["INSTALLERS", "Installer", "check", "install", "installer", "installer_for", "ordered"]
