"""``loraq serve`` as a function: one base, many adapters, an OpenAI-compatible server (:mod:`loraq.serving`).

    server = loraq.serve(adapter={"tuned": "runs/demo"}, port=0)   # running, model loaded
    server.url                                                     # http://127.0.0.1:PORT
    server.stop()

The base is the one the first adapter was trained on, as ``loraq generate --adapter`` chooses it (a QLoRA
adapter's 4-bit base with its recorded settings), or ``model`` (``quant`` nf4/fp4 for a 4-bit copy); every
other adapter must fit that base (refused at load with the reason otherwise).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from loraq.choices import INFERENCE_QUANT
from loraq.errors import ConfigError


def serve(*, model: str | None = None, adapter: Mapping[str, str] | None = None, adapters_dir: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, admin_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, max_active_adapters: int = 16, dtype: str = "auto",
          quant: str = "auto", allow_pickle: bool = False, trust_remote_code: bool = False, block: bool = False,
          say: Callable[[str], None] | None = None):
    """Start a :class:`loraq.serving.server.Server`: returned running with the model loaded, or with
    ``block`` served on this thread until SIGTERM / SIGINT (what the command does)."""
    from loraq.serving.server import Limits, Server, adapters_in

    for flag, value, low in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                             ("--max-active-adapters", max_active_adapters, 1), ("--port", port, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low} (got {value})")
    if quant not in INFERENCE_QUANT:
        raise ConfigError(f"--quant {quant!r} is not one of: {', '.join(INFERENCE_QUANT)}")
    named = dict(adapters_in(adapters_dir)) if adapters_dir else {}
    named.update(adapter or {})
    from loraq.lora.files import read_adapter_config

    for path in named.values():  # a mistyped folder fails before anything loads
        read_adapter_config(path)
    first = next(iter(named.values()), None)
    keywords = {"dtype": dtype, "quant": quant, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    server = Server(lambda: load_base(model, first, say=say, **keywords), named, host=host, port=port,
                    api_key=api_key, admin_key=admin_key if admin_key is not None else api_key,
                    limits=Limits(max_batch, max_queue, max_active_adapters), say=say)
    if block:
        server.run()
        return server
    return server.start(wait=True)


def load_base(model: str | None, first_adapter: str | None, *, dtype: str, quant: str, allow_pickle: bool,
              trust_remote_code: bool, say: Callable[[str], None] | None = None):
    """``(LoadedModel, ServedBase)``: the base for ``first_adapter`` (as loraq generate chooses it), else ``model``."""
    from loraq.lora.record import QuantSettings
    from loraq.serving.adapters import ServedBase

    if first_adapter is not None:
        from loraq.lora.adapted import load_planned_base, plan_base

        plan = plan_base(first_adapter, model, base="original" if quant == "none" else "auto",
                         quant=quant if quant in ("nf4", "fp4") else None, dtype=dtype, allow_pickle=allow_pickle)
        if plan.replays_init or plan.splits_factors:
            raise ConfigError(f"adapter {first_adapter} was initialised with {plan.record.init}, which changes the "
                              "base it trains against; serve its merged model instead (`loraq merge`)")
        loaded = load_planned_base(plan, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        if say is not None:
            weights = f"4-bit ({plan.quant.describe()})" if plan.quant else "full-precision"
            say(f"the base: {plan.source.name}, {weights}, as {first_adapter} was trained")
        return loaded, ServedBase(plan.source.name, str(plan.source.path), plan.quant, plan.dtype)
    from loraq.api.loading import load_for_inference
    from loraq.models.source import resolve_source

    source = resolve_source(model, allow_pickle=allow_pickle)
    loaded = load_for_inference(model, dtype=dtype, quant=quant, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    four_bit = QuantSettings(quant) if quant in ("nf4", "fp4") else None
    return loaded, ServedBase(source.name, str(source.path), four_bit, dtype)
