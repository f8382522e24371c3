"""The adapters a server knows: any number registered, a few installed in the model at once (an LRU).

Registering an adapter checks it against the served base before anything changes: its training record's base
(:func:`loraq.lora.adapted.plan_base`: the weights fingerprint, and the 4-bit settings it was trained on, which
must be the base's), its targets and every tensor's shape (:func:`loraq.lora.files.checked_adapter`), and that
it can share a batch (no DoRA, no whole trained modules, no initialisation that changed the base). A refusal is a
:class:`~loraq.errors.LoraqError` naming the reason; the server keeps serving.

Installed adapters live in the model under internal names (``served1``, ``served2``, ...): a request routes to a
public name's *current* install, so reloading a name installs the new version beside the old one; rows still
decoding keep the old until they finish, then it is removed. At most ``max_active`` installs are kept; the least
recently used one that no row uses is evicted to make room, and reinstalled from its folder on the next request.

Registration and reading files happen on the caller's thread (an evicted adapter's files are read again by
:meth:`AdapterRegistry.prefetch` on the thread of the request that needs it); :meth:`AdapterRegistry.activate`
(installing, evicting) runs on the decode thread between steps, so the model never changes under a step.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraq.errors import AdapterError
from loraq.lora.record import QuantSettings


@dataclass(frozen=True)
class ServedBase:
    """The base a server runs: ``spec`` its resolved folder (adapters are checked against its weights), its 4-bit
    settings (None: full precision)."""

    name: str
    spec: str | None
    quant: QuantSettings | None
    dtype: str


@dataclass
class Registered:
    """A public adapter name's current version: its folder, checked config and rank."""

    name: str
    path: Path
    version: int
    rank: int
    corrected: bool  # a calibrated-init adapter: its frozen correction of the 4-bit base is installed with it
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # read at registration, then dropped
    prefetched: bool = False  # tensors read again after an eviction (checked again when installed)
    config: object = field(default=None, repr=False)


class AdapterRegistry:
    """Public adapter names -> folders, and which versions are installed (see the module docstring)."""

    def __init__(self, model: nn.Module, base: ServedBase, max_active: int = 16,
                 on_event: Callable[[str, str], None] | None = None):
        self.model, self.base, self.max_active = model, base, max(1, max_active)
        self.registered: dict[str, Registered] = {}
        self.installed: OrderedDict[tuple[str, int], str] = OrderedDict()  # (name, version) -> internal, LRU order
        self.lock = threading.Lock()  # the model's structure: checks read it, installs change it
        self.on_event = on_event or (lambda kind, name: None)
        self._versions = 0
        self.changes = 0  # installs and removals so far: the decode thread re-lays its adapter stacks on a change

    def register(self, name: str, path: str | Path) -> Registered:
        """Check the folder against the base and make it ``name``'s current version (replacing any)."""
        from loraq.lora.files import check_adapter_tensors, read_adapter_config, read_adapter_tensors

        path = Path(path).expanduser()
        plan = self._plan(name, path)
        config, tensors = read_adapter_config(path), read_adapter_tensors(path)  # no lock: decoding goes on
        with self.lock:  # against the model's layers as they are (installs change them)
            check_adapter_tensors(self.model, config, tensors, path)
        if config.use_dora:
            raise AdapterError(f"adapter {name!r} ({path}) is a DoRA adapter: its magnitude rescales the base's "
                               "output, so it cannot share a batch; merge it (`loraq merge`) and serve the result")
        if config.modules_to_save:
            raise AdapterError(f"adapter {name!r} ({path}) trains whole modules ({', '.join(config.modules_to_save)}), "
                               "which cannot share a batch; merge it (`loraq merge`) and serve the result")
        with self.lock:
            self._versions += 1
            entry = Registered(name, path, self._versions, int(config.r), plan.corrects_base, tensors=tensors,
                               config=config)
            self.registered[name] = entry
        return entry

    def _plan(self, name: str, path: Path):
        from loraq.lora.adapted import plan_base

        plan = plan_base(path, self.base.spec, dtype=self.base.dtype, warn=lambda m: None)
        if plan.replays_init or plan.splits_factors:
            raise AdapterError(f"adapter {name!r} ({path}) was initialised with {plan.record.init}, which changed the "
                               "base it trains against; a shared base cannot serve it: merge it (`loraq merge`)")
        if plan.record is not None and plan.quant != self.base.quant:  # no record (made elsewhere): shapes decide
            want = self.base.quant.describe() if self.base.quant else "full precision"
            got = plan.quant.describe() if plan.quant else "full precision"
            raise AdapterError(f"adapter {name!r} ({path}) was trained on a {got} base; this server's base is "
                               f"{want}: serve it from a server started with such a base")
        return plan

    def prefetch(self, name: str) -> None:
        """Read an evicted adapter's tensors now (a request's thread), so installing it on the decode thread
        does not wait for the disk."""
        from loraq.lora.files import read_adapter_tensors

        entry = self.registered.get(name)
        if entry is None or entry.tensors is not None or (entry.name, entry.version) in self.installed:
            return
        entry.tensors, entry.prefetched = read_adapter_tensors(entry.path), True

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.registered:
                raise KeyError(name)
            del self.registered[name]

    def names(self) -> list[str]:
        return list(self.registered)

    def route_of(self, name: str) -> tuple[str, int]:
        """The (name, version) a new request for ``name`` uses; KeyError when it is not registered."""
        entry = self.registered[name]
        return entry.name, entry.version

    def activate(self, wanted: set[tuple[str, int]], in_use: set[tuple[str, int]]) -> dict[tuple[str, int], str] | None:
        """Install every version in ``wanted`` (evicting unused ones beyond ``max_active``) and drop versions no
        longer registered nor in use; the internal names, or None when there is no room yet (all in use)."""
        with self.lock:
            self._drop_stale(in_use)
            missing = [key for key in wanted if key not in self.installed]
            busy = in_use | wanted
            while len(self.installed) + len(missing) > self.max_active:
                victim = next((k for k in self.installed if k not in busy), None)
                if victim is None:
                    return None
                self._uninstall(victim, "eviction")
            for key in missing:
                self._install(key)
            for key in wanted:
                self.installed.move_to_end(key)
            return {key: self.installed[key] for key in wanted}

    def _drop_stale(self, in_use: set[tuple[str, int]]) -> None:
        current = {(e.name, e.version) for e in self.registered.values()}
        for key in [k for k in self.installed if k not in current and k not in in_use]:
            self._uninstall(key, "unload")

    def _install(self, key: tuple[str, int]) -> None:
        from loraq.lora.files import check_adapter_tensors, checked_adapter, install_adapter

        entry = self.registered.get(key[0])
        if entry is None or entry.version != key[1]:
            raise AdapterError(f"adapter {key[0]!r} was unloaded")
        internal = f"served{key[1]}"
        config, tensors = entry.config, entry.tensors
        if tensors is None:  # evicted earlier and not prefetched: read from its folder again
            config, tensors = checked_adapter(self.model, entry.path)
        elif entry.prefetched:  # read again since it was registered: checked again (the folder may have changed)
            check_adapter_tensors(self.model, config, tensors, entry.path)
        install_adapter(self.model, config, tensors, internal)
        if entry.corrected:
            from loraq.lora.correction import load_correction

            load_correction(self.model, entry.path, internal)
        entry.tensors, entry.prefetched = None, False  # the model holds them now
        self.installed[key] = internal
        self.changes += 1
        self.on_event("load", key[0])

    def _uninstall(self, key: tuple[str, int], kind: str) -> None:
        from loraq.lora.model import delete_adapter

        delete_adapter(self.model, self.installed.pop(key))
        self.changes += 1
        self.on_event(kind, key[0])
