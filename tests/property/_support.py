"""Helpers shared by test_issue11.py and test_property.py (public lin_lens API and TransformerLens
hook names only; nothing here imports a lin_lens private name).

* :func:`err` — a class from ``lin_lens.errors`` (issue 11), or a placeholder that is never raised
  while that module does not exist, so ``pytest.raises(err("X"))`` fails with the raw error.
* :func:`model_state` — hooks on every hook point and module, ``requires_grad`` flags, simple cfg
  fields, ``is_detached``, grad mode, functorch level: what lin_lens must leave as it found it.
* :func:`frozen_jacobian` — the reference Jacobian: the model run with every frozen factor (norm
  scales, attention patterns, MLP gates, router weights, logit soft cap) *replaced by the value
  recorded in a plain forward pass*, which makes the function affine by construction, then
  ``torch.autograd.functional.jacobian``. Independent of lin_lens.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import warnings

import torch

os.environ.setdefault("LIN_LENS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lin_lens  # noqa: E402


def _has_hooked() -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformer_lens import HookedTransformer  # noqa: F401  (TL < 4 only)
        except ImportError:
            return False
    return True


HAS_HOOKED = _has_hooked()


class _Missing(Exception):
    """Stands in for a lin_lens.errors class that does not exist yet (never raised)."""


def err(name: str) -> type[BaseException]:
    """``lin_lens.errors.<name>``, or a never-raised placeholder while it does not exist."""
    try:
        mod = importlib.import_module("lin_lens.errors")
    except ImportError:
        return type(f"Missing_lin_lens_errors_{name}", (_Missing,), {})
    return getattr(mod, name, type(f"Missing_{name}", (_Missing,), {}))


def lin_lens_error() -> tuple[type[BaseException], ...]:
    """What counts as a lin_lens error: LinLensError once it exists."""
    base = err("LinLensError")
    return (base,)


def top_singular():
    """``lin_lens.top_singular`` if exported, else ``lin_lens.engines.top_singular``."""
    f = getattr(lin_lens, "top_singular", None)
    if f is None:
        f = importlib.import_module("lin_lens.engines").top_singular
    return f


# -- model state -----------------------------------------------------------------------------

_SIMPLE = (bool, int, float, str, type(None))


def model_state(model) -> dict:
    """Everything lin_lens may touch and must restore."""
    hp_hooks = {name: (len(hp.fwd_hooks), len(hp.bwd_hooks))
                for name, hp in model.hook_dict.items()}
    mod_hooks = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
               len(getattr(m, "_backward_pre_hooks", {})))
        for name, m in model.named_modules()
    }
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = {k: v for k, v in vars(model.cfg).items() if isinstance(v, _SIMPLE)}
    level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)()
    return dict(hp_hooks=hp_hooks, mod_hooks=mod_hooks, requires_grad=rg, cfg=cfg,
                detached=lin_lens.is_detached(model), training=model.training,
                grad_enabled=torch.is_grad_enabled(), functorch_level=level)


def state_diff(before: dict, after: dict) -> list[str]:
    out = []
    for key in before:
        b, a = before[key], after[key]
        if b == a:
            continue
        if isinstance(b, dict):
            keys = [k for k in set(b) | set(a) if b.get(k) != a.get(k)]
            out.append(f"{key}: " + ", ".join(f"{k}: {b.get(k)} -> {a.get(k)}"
                                              for k in sorted(keys)[:4])
                       + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""))
        else:
            out.append(f"{key}: {b} -> {a}")
    return out


# -- the reference Jacobian ------------------------------------------------------------------

def _prefix(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def frozen_points(model) -> dict[str, str]:
    """hook name → how the reference freezes it: "const" (replace by the recorded value) or
    "ratio" (value0 + g0·(pre − pre0) with g0 = value0/pre0, for plain MLPs / SoLU)."""
    names = set(model.hook_dict)
    out: dict[str, str] = {}
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        pre = _prefix(name)
        if leaf in ("hook_scale", "hook_pattern", "hook_expert_weights"):
            out[name] = "const"
        elif leaf == "hook_gate" and ".experts." in name:
            out[name] = "const"
        elif leaf == "hook_pre" and name.endswith("mlp.hook_pre"):
            if f"{pre}.hook_pre_linear" in names:
                out[name] = "const"  # gated MLP: the gate pre-activation only feeds act()
            else:
                act = str(getattr(model.cfg, "act_fn", ""))
                at = f"{pre}.hook_mid" if act.endswith("_ln") and f"{pre}.hook_mid" in names \
                    else f"{pre}.hook_post"
                out[at] = "ratio:" + name
    # A Bridge alias and its canonical name share one HookPoint: keep one name per point.
    seen: dict[int, str] = {}
    for name in sorted(out, key=len):
        hp = model.hook_dict[name]
        if id(hp) in seen:
            del out[name]
        else:
            seen[id(hp)] = name
    return out


class _Recorder:
    """Per-firing records of the frozen factors in one plain forward pass."""

    def __init__(self, model):
        self.model = model
        self.points = frozen_points(model)
        self.values: dict[str, list[torch.Tensor]] = {}
        self.pre: dict[str, list[torch.Tensor]] = {}

    def hooks(self):
        fw = []
        for name, how in self.points.items():
            if how.startswith("ratio:"):
                pre = how.split(":", 1)[1]
                fw.append((pre, self._rec(self.pre, pre)))
            fw.append((name, self._rec(self.values, name)))
        return fw

    @staticmethod
    def _rec(store, key):
        def fn(t, hook):
            store.setdefault(key, []).append(t.detach().clone())
        return fn


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def frozen_function(model, tokens, target: str, pos: list[int], source: str = "hook_embed",
                    out_index=None, direction=None, dtype=None):
    """(f, x0, rec): ``f(x)`` is the target (rows ``pos``, flattened) of ``model`` run with the
    source activation replaced by ``x`` and every frozen factor by its recorded value; affine by
    construction. ``dtype``: run a copy of the model in this dtype with the factors recorded
    in the model's own dtype (e.g. float64 for a float32 model)."""
    rec = _Recorder(model)
    cap: dict[str, torch.Tensor] = {}
    cap_fw = [(source, lambda t, hook: cap.__setitem__("x0", t.detach().clone()))]
    soft = getattr(model.cfg, "output_logits_soft_cap", None) or -1
    soft_mod = []
    if soft > 0 and hasattr(model, "unembed"):
        soft_mod.append(model.unembed.register_forward_hook(
            lambda m, a, o: cap.__setitem__("z0", o.detach().clone())))
    try:
        with torch.no_grad():
            logits0 = model.run_with_hooks(tokens, fwd_hooks=rec.hooks() + cap_fw)
    finally:
        for h in soft_mod:
            h.remove()
    run = model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        run = copy.deepcopy(model).to(dtype)
    dt = next(p for p in run.parameters() if p.is_floating_point()).dtype
    vals = {k: [_cast(v, dt) for v in vs] for k, vs in rec.values.items()}
    pres = {k: [_cast(v, dt) for v in vs] for k, vs in rec.pre.items()}
    x0 = cap["x0"].to(dt)
    z0 = cap.get("z0")
    g_soft = None
    if z0 is not None:
        z0 = z0.to(dt)
        l0 = logits0.detach().to(dt)
        g_soft = torch.where(z0 == 0, torch.ones_like(z0), l0 / torch.where(z0 == 0, 1, z0))

    def f(x: torch.Tensor) -> torch.Tensor:
        count: dict[str, int] = {}
        live: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}

        def k_of(name):
            i = count.get(name, 0)
            count[name] = i + 1
            return i

        def const_for(name):
            def fn(t, hook):
                return vals[name][k_of(name)].clone()
            return fn

        def keep_pre_for(pre):
            def fn(t, hook):
                live[pre] = t
            return fn

        def ratio_for(name, pre):
            def fn(t, hook):
                i = k_of(name)
                v0, p0 = vals[name][i], pres[pre][i]
                g0 = torch.where(p0 == 0, torch.zeros_like(p0), v0 / torch.where(p0 == 0, 1, p0))
                return v0 + g0 * (live[pre] - p0)
            return fn

        fw = [(source, lambda t, hook: x)]
        for name, how in rec.points.items():
            if how == "const":
                if name in vals:  # hooks that did not fire in the recording stay alone
                    fw.append((name, const_for(name)))
            else:
                pre = how.split(":", 1)[1]
                fw.append((pre, keep_pre_for(pre)))
                fw.append((name, ratio_for(name, pre)))
        if target != "logits":
            fw.append((target, lambda t, hook: out.__setitem__("y", t)))
        z_live = {}
        mods = []
        if g_soft is not None:
            mods.append(run.unembed.register_forward_hook(
                lambda m, a, o: z_live.__setitem__("z", o)))
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # the reference replaces hook_scale by a recorded value: on a Bridge's native
                # norm path that is the rebuild this warning announces (rounding-level change)
                warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
                logits = run.run_with_hooks(tokens, fwd_hooks=fw)
        finally:
            for h in mods:
                h.remove()
        if target == "logits":
            y = z_live["z"] * g_soft if g_soft is not None else logits
        else:
            y = out["y"]
        y = y[0, pos].reshape(len(pos), -1)
        if out_index is not None:
            y = y[:, torch.as_tensor(out_index)]
        if direction is not None:
            y = (y * torch.as_tensor(direction, dtype=y.dtype)).sum(-1, keepdim=True)
        return y

    return f, x0, rec


def reference_jacobian(model, tokens, target, pos, **kw):
    """(J_ref [n_t, n_src, d_out, d_in], y0 [n_t, d_out]) of the frozen-factor function."""
    f, x0, _ = frozen_function(model, tokens, target, pos, **kw)
    with torch.enable_grad():
        y0 = f(x0).detach()
        J = torch.autograd.functional.jacobian(f, x0)  # [n_t, d_out, 1, n, *src]
    J = J.reshape(y0.shape[0], y0.shape[1], x0.shape[1], -1).permute(0, 2, 1, 3)
    return J, y0


@contextlib.contextmanager
def no_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
