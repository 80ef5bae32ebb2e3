"""budgetlm: train a language model on one GPU within a fixed time budget.

The Python API (`budgetlm.api`), loaded on first use so `import budgetlm` stays fast:
`prepare`, `pretrain`, `load` (-> a model with `.generate`, `.evaluate`, `.finetune`), `finetune`,
`predict`, `suite`; errors a user can fix raise `UserError` with the CLI's message.
"""

import importlib
import types

__version__ = "0.1.0"
__all__ = ["UserError", "finetune", "load", "predict", "prepare", "pretrain", "suite"]

_API = {"finetune", "load", "predict", "prepare", "pretrain", "suite"}
# `budgetlm.pretrain` and `budgetlm.finetune` are also modules (the verbs' code). Python sets a
# submodule as its package's attribute once imported, so those two are made callable: calling
# one calls the API function, and `budgetlm.pretrain.pretrain_command` still reaches the module.
_SHADOWED = {"pretrain", "finetune"}


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from budgetlm import api

        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


def __getattr__(name):
    if name in _SHADOWED:
        return importlib.import_module(f"{__name__}.{name}")  # the module, callable (see above)
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    if name == "UserError":
        from budgetlm.errors import UserError

        return UserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
