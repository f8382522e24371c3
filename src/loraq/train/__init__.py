"""The training loop and its files.

``loraq.train`` is both this package and the function :func:`loraq.train.api.train`:
once any ``loraq.train.<module>`` is imported, Python binds the package to the
name ``loraq.train``, shadowing the lazily imported function; calling the
package therefore calls the function, so ``loraq.train(...)`` works either way.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from loraq.train.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
