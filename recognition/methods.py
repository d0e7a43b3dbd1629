"""The registry of training methods: ``--method NAME`` picks a ``method.TrainingMethod`` subclass by its name.

The built-in methods are registered below; another one is one ``register_method(MyMethod)`` call (before the
config is parsed), e.g. in a package of its own that the caller imports before ``train.main``.
"""
from recognition.ffc.method import FFCMethod
from recognition.method import TrainingMethod
from recognition.partial_fc.method import PartialFCMethod

_REGISTRY = {}


def register_method(cls):
    """Register ``cls`` (a TrainingMethod subclass with a ``name``) under its name; returns ``cls``, so it also
    works as a class decorator. A name registered twice is an error (unless it is the same class)."""
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
        raise TypeError("a training method must subclass recognition.method.TrainingMethod, got %r" % (cls,))
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError("training method %s has no name" % cls.__name__)
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError("training method name %r is taken by %s" % (cls.name, known.__name__))
    _REGISTRY[cls.name] = cls
    return cls


def method_names():
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def method_class(name):
    """The class registered as ``name``; ValueError listing the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError("unknown training method %r; choose one of: %s" % (name, ", ".join(_REGISTRY))) from None


def registered_methods():
    """The registered classes, in registration order."""
    return tuple(_REGISTRY.values())


for _builtin in (PartialFCMethod, FFCMethod):
    register_method(_builtin)
