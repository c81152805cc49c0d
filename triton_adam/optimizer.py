"""``Adam`` and ``AdamW``: drop-in ``torch.optim`` optimizers whose step is one fused launch."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _compile, _differentiable, _distributed, _precision, _quantize, _validation
from ._distributed import local
from ._plan import GradDtypeChanged, StepPlan, interpreter_enabled
from ._state_prep import normalize_steps, prepared_state
from ._steady_step import SteadyStep, group_flags
from ._tracked_state import TrackedStateTable, tracked

BACKENDS = ("auto", "triton", "torch")

_COMMON_DOC = """
    Args:
        params: iterable of parameters or of dicts defining parameter groups (named parameters
            work as in torch).
        lr (float or Tensor): learning rate. A 1-element tensor on the params' device is read on
            the device at every step (so a captured CUDA graph follows its later values).
        betas (tuple of two floats or two 1-element Tensors): coefficients of the running
            averages of the gradient and of its square.
        eps (float): added to the bias-corrected root of the second moment.
        weight_decay (float): {wd_doc}
        amsgrad (bool): use the maximum of past second moments (AMSGrad).
        maximize (bool): maximize the objective instead of minimizing it.
        capturable (bool): allow the step to be captured in a CUDA graph (as in torch). The step
            never synchronizes with the host in either mode: step counts, bias corrections and
            the GradScaler's ``found_inf`` stay on the device.
        foreach, fused: accepted for compatibility and ignored; the step is always fused.
        differentiable (bool): autograd through the step, as torch's: such groups run torch's
            own differentiable single-tensor Adam (not the fused kernels) on this optimizer's
            state, and non-leaf params are accepted as torch accepts them. Not with
            max_grad_norm, skip_nonfinite, fused=True or this package's other options
            (eps_mode, bias_correction, weight_decay_mode, state_dtype, master_weights,
            kahan_summation, stochastic_rounding at their defaults): a ValueError names them.
        max_grad_norm (float, optional): clip the grads' global 2-norm (over every param of
            the optimizer) to this, folded into the update: the step reads the grads once for
            the norm and once for the update and never rewrites them. Same result as
            ``torch.nn.utils.clip_grad_norm_`` then ``step()``; under a GradScaler the norm is
            of the unscaled grads. The norm of each step is ``opt.last_grad_norm``. (On the
            torch fallback the clip goes through torch's fused kernel, which leaves the grads
            clipped, as ``clip_grad_norm_`` would.)
        skip_nonfinite (bool): a NaN/inf in any grad skips the whole update (params, states and
            step counts) on the device, without host synchronisation;
            ``opt.last_step_skipped`` is a device bool tensor.
        eps_mode ("torch" or "paper"): "paper" is the Adam paper's efficient form (also
            TF/Keras): ``p -= lr*sqrt(1-beta2**t)/(1-beta1**t) * m / (sqrt(v) + eps)``, eps on the
            uncorrected root; "torch" adds eps after the bias correction.
        bias_correction (bool): False drops both bias corrections.
        weight_decay_mode ("torch" or "schedule"): for decoupled decay, "torch" decays by
            ``lr * weight_decay``; "schedule" by ``eta_t * weight_decay`` with the schedule
            multiplier ``eta_t = lr / initial_lr`` (the AdamW paper's Algorithm 2 and
            keras-adamw), where ``initial_lr`` is the group's lr as torch's lr schedulers record
            it (without a scheduler, ``eta_t = 1``).
        state_dtype (torch.dtype or str, optional): hold ``exp_avg``, ``exp_avg_sq`` (and
            ``max_exp_avg_sq``) in torch.float32 or torch.bfloat16 whatever the param dtype
            (float32/bfloat16/float16 params); the math stays float32 and each
            stored value is rounded once (to nearest even). ``torch.bfloat16`` for float32
            params halves the state (8 -> 4 bytes per param; what torch's CUDA fused AdamW does
            when the states are created bfloat16). None (default): the param's dtype, as torch.
            Loaded moments are rounded to it once.
            "int8", "fp8", "int4": blockwise quantised moments (codes and a float32 scale per
            256 elements, 128 for int4: about 2.03 bytes per param, 1.06 for int4, instead of
            8; see ``triton_adam._quantize``) for params of at least ``min_quantized_numel``
            elements, float32 moments for smaller ones, in the same launch; with amsgrad and
            any precision rung. ``state_dict()`` holds dense float32 moments (torch's form),
            ``state_dict(compact=True)`` the codes and scales. DTensor params are quantised in
            blocks of each rank's local shard (int8, fp8: the codes DTensors, the scales plain
            local tensors; quantised or not by the whole param's numel), and
            ``state_dict(compact=True)`` refuses them (a ValueError): a distributed checkpoint
            would keep one rank's scales for all.
        min_quantized_numel (int): with quantised moments, params with fewer elements keep
            float32 moments (default 4096: biases and norms).
        quant_block_size (int, optional): elements per float32 scale of quantised moments,
            64, 128, 256 or 512 (None: 256 for "int8" and "fp8", 128 for "int4"). Smaller
            blocks follow outliers more closely and hold 4 bytes of scale per block and
            moment.
        master_weights (bool or "compact"): for bfloat16/float16 params, step a float32 master
            in the param's place and write its rounding back to the param, in the same launch;
            the master's trajectory is float32 torch AdamW's, bit for bit. True keeps the
            master as a float32 copy (state key ``master_param``, 4 bytes per param) and
            rounds the param to nearest even. "compact" (bfloat16 params) keeps only the
            master's low 16 bits (``master_remainder``, int16, 2 bytes per param): the param,
            rounded half away from zero, is its high half, so the master is exact and its
            trajectory is True's (the param differs from True's only where the master lies
            exactly halfway between two bfloat16 values). A param written from outside the
            optimizer restarts its master from it (True), or keeps its new value plus at most
            half an ulp of the stale remainder ("compact"). Moments default to float32.
            ``state_dict()`` always holds the dense float32 ``master_param``.
        kahan_summation (bool): for bfloat16/float16 params, keep what the param's rounding
            lost in a compensation buffer of the param's dtype (``kahan_compensation``, 2
            bytes per param) and add it back at the next step, so that updates below half an
            ulp accumulate instead of vanishing (as optimi's Kahan summation).
        stochastic_rounding (bool): for bfloat16 params, round the updated param
            stochastically (up with probability proportional to the dropped bits: unbiased),
            from a counter-based random stream keyed on (seed, step, param, element): no state,
            the same bits for the same seed, a resumed run continues the stream.
        seed (int): the stochastic-rounding seed of the group, in [0, 2**32), kept in the
            param group (so in ``state_dict()``). The default, 0, is the same in every
            process, so that replicas (DDP, replicated DTensor dims) round alike; give each
            run its own seed for independent streams. master_weights, kahan_summation and
            stochastic_rounding exclude one another.
        backend ("auto", "triton" or "torch"): "auto" runs the Triton kernels on CUDA tensors
            (and on CPU tensors when ``TRITON_INTERPRET=1``), torch's fused kernels elsewhere or
            for float64 params; "triton" and "torch" force one, with a clear error where it
            cannot run.

    Behaviour matches torch: params whose ``.grad`` is None are skipped, the state uses torch's
    keys (``step`` a 0-d float32 tensor on the param's device, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) and state dicts load both ways. Under ``torch.amp.GradScaler`` the kernel
    unscales the grads in registers and skips the whole update (and the step count) when
    ``found_inf`` is set, without host synchronisation; unlike torch's fused kernel it does not
    write the unscaled grads back into ``.grad`` (4 bytes per element saved).
"""


class _FusedAdamBase(torch.optim.Optimizer):
    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, *, foreach, maximize,
                 capturable, differentiable, fused, decoupled_weight_decay, backend,
                 max_grad_norm, skip_nonfinite, eps_mode, bias_correction, weight_decay_mode,
                 state_dtype, master_weights, kahan_summation=False, stochastic_rounding=False,
                 seed=0, min_quantized_numel=_quantize.MIN_QUANTIZED_NUMEL,
                 quant_block_size=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0 or None)")
        _validation.check_formulation(eps_mode, weight_decay_mode)
        _validation.check_state_dtype(state_dtype)
        _validation.check_quant_block_size(quant_block_size)
        _precision.check_options(master_weights, kahan_summation, stochastic_rounding, seed)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_grad_norm = None
        self.last_step_skipped = None
        _validation.check_hyperparameters(lr, betas, eps, weight_decay)
        betas = tuple(map(_validation.to_scalar, betas))
        self.backend = backend
        self._plan = None
        self._captured_plans = []
        self._layout_version = 0
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, eps_mode=eps_mode,
                        bias_correction=bias_correction, weight_decay_mode=weight_decay_mode,
                        state_dtype=state_dtype, master_weights=master_weights,
                        kahan_summation=kahan_summation,
                        stochastic_rounding=stochastic_rounding, seed=seed,
                        min_quantized_numel=min_quantized_numel,
                        quant_block_size=quant_block_size)
        super().__init__(params, defaults)
        self.state = TrackedStateTable(self.state)  # see _tracked_state
        # GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself.
        self._step_supports_amp_scaling = True

    # dynamo runs an optimizer's _init_group eagerly while tracing step() (see _compile)
    _init_group = _compile.init_group

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group after checking its hyperparameters and params (see torch)."""
        merged = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        _validation.check_hyperparameters(merged["lr"], merged["betas"], merged["eps"],
                                          merged["weight_decay"])
        _validation.check_formulation(merged["eps_mode"], merged["weight_decay_mode"])
        _validation.check_state_dtype(merged.get("state_dtype"))
        _validation.check_quant_block_size(merged.get("quant_block_size"))
        _precision.check_options(merged.get("master_weights", False),
                                 merged.get("kahan_summation", False),
                                 merged.get("stochastic_rounding", False), merged.get("seed"))
        _differentiable.check_group(self, merged, len(self.param_groups))
        if "betas" in param_group:
            param_group["betas"] = tuple(map(_validation.to_scalar, param_group["betas"]))
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        try:
            # torch's differentiable step takes any tensor (non-leaf, strided); the plan never
            # sees these params
            checked = [] if merged.get("differentiable") else self.param_groups[-1]["params"]
            for position, param in enumerate(checked):
                _validation.check_param(group_index, position, param)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._invalidate_plan()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.state = TrackedStateTable(self.state)  # see _tracked_state
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_layout_version", 0)
        self.__dict__.setdefault("_captured_plans", [])
        for key, default in (("max_grad_norm", None), ("skip_nonfinite", False),
                             ("last_grad_norm", None), ("last_step_skipped", None)):
            self.__dict__.setdefault(key, default)
        for group in self.param_groups:
            for key, default in (("amsgrad", False), ("maximize", False), ("foreach", None),
                                 ("capturable", False), ("differentiable", False),
                                 ("fused", None), ("decoupled_weight_decay", False),
                                 ("eps_mode", "torch"), ("bias_correction", True),
                                 ("weight_decay_mode", "torch"), ("state_dtype", None),
                                 ("master_weights", False), ("kahan_summation", False),
                                 ("stochastic_rounding", False), ("seed", 0),
                                 ("min_quantized_numel", _quantize.MIN_QUANTIZED_NUMEL),
                                 ("quant_block_size", None)):
                group.setdefault(key, default)
        self._normalize_steps()
        self._invalidate_plan()

    def state_bytes(self, per_param: bool = False):
        """Bytes of optimizer state this process holds: every per-element state tensor
        (moments, master, master remainder, Kahan compensation; a DTensor's local shard), not
        the 0-d step counters, params or grads.

        Args:
            per_param (bool): return ``{param: bytes}`` (params with state only) instead of
                the total.
        """
        held = {}
        for param, state in self.state.items():
            if not isinstance(param, Tensor) or not isinstance(state, dict):
                continue  # an entry that is not a param's
            held[param] = sum(local(t).numel() * local(t).element_size()
                              for t in state.values() if isinstance(t, Tensor) and t.dim() > 0)
        return held if per_param else sum(held.values())

    def state_dict(self, compact: bool = False) -> dict:
        """torch's state dict, loadable by torch.optim.Adam/AdamW: torch's keys, plus each
        16-bit param's float32 master as a dense float32 ``master_param`` (also when it is
        kept as a remainder, ``master_weights="compact"``) or its ``kahan_compensation``;
        the stochastic-rounding seed is in the param groups.

        Args:
            compact (bool): keep quantised moments (``state_dtype="int8"``, ``"fp8"``,
                ``"int4"``) as they are held, codes and float32 block scales under the live
                state's keys, instead of decoding them to dense float32 moments: about a
                quarter of the size for int8 (about half with a master, which both hold as
                a dense float32 ``master_param``). Only this package's ``load_state_dict`` reads
                such a dict (into any storage mode: the next step decodes or re-lays the codes
                where it must); torch's optimizers do not. int4's packed codes carry no layout:
                a param not laid out row-major has its moments written dense. Refused (a
                ValueError) for DTensor params with quantised moments (see state_dtype).
        """
        if compact:
            self._check_compact()
        saved = super().state_dict()
        # plain dicts, as torch's (ours count their changes, see _tracked_state; a checkpoint
        # must load with torch.load(weights_only=True) anywhere)
        saved["state"] = {key: dict(value) if isinstance(value, dict) else value
                          for key, value in saved["state"].items()}
        params = [p for group in self.param_groups for p in group["params"]]
        for index, live in saved["state"].items():
            if not isinstance(index, int) or not isinstance(live, dict):
                continue  # an entry that is not a param's (torch returns it as it is)
            state = live
            if _quantize.is_quantized(state) and not (
                    compact and _quantize.portable_codes(params[index], state)):
                # quantised moments: dense float32 ones, torch's form
                state = _quantize.convert(params[index].detach(), state, quantize=False)
            if "master_remainder" in state:
                master = _precision.dense_master(params[index], state)
                state = {**{k: v for k, v in state.items() if k != "master_remainder"},
                         "master_param": master}
            if state is not live:
                saved["state"][index] = _snapshot(state, live)
        return saved

    def _check_compact(self) -> None:
        """Refuse a compact state dict of DTensor params with quantised moments.

        Their block scales are plain tensors of this rank's local shard (a DTensor cannot hold
        them: each rank's blocks are its own shard's, not a slice of one global layout), and a
        distributed checkpoint keeps a single rank's copy of a plain tensor: every other rank
        would load that rank's scales, silently.
        """
        for gi, group in enumerate(self.param_groups):
            for pi, param in enumerate(group["params"]):
                state = self.state.get(param)
                if state and _distributed.is_dtensor(param) and _quantize.is_quantized(state):
                    raise ValueError(
                        f"{_validation.describe(gi, pi, param)}: state_dict(compact=True) "
                        "cannot hold the quantised moments of a DTensor param (their block "
                        "scales are this rank's own, and a distributed checkpoint keeps one "
                        "rank's copy of them); use state_dict() or torch.distributed."
                        "checkpoint.state_dict.get_optimizer_state_dict, whose dense float32 "
                        "moments are DTensors")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class or by torch.optim.Adam/AdamW (any device).

        Every state tensor (moments, float32 masters, a compact state dict's codes and
        float32 block scales) keeps the dtype it was saved in (torch's loader would cast them
        to the params' dtype, rounding float32 moments, masters or scales of 16-bit params and
        turning codes into floats). How the state is held (state_dtype, master_weights,
        kahan_summation, stochastic_rounding, min_quantized_numel) stays as this optimizer was
        built: the next step converts the loaded state to it (a True checkpoint loads into
        "compact" and back, the master exactly; a torch checkpoint starts masters from the
        params; dense moments are quantised and codes decoded where the param's storage
        differs). Everything else in the param groups (lr, betas, ..., the stochastic-rounding
        seed) is the checkpoint's, as in torch.
        """
        # every state tensor but the step count, whatever its key (codes and their
        # float32 scales included): torch's loader casts them all to the param's dtype
        kept = {(key, name): tensor for key, value in state_dict["state"].items()
                if isinstance(value, dict)
                for name, tensor in value.items()
                if name != "step" and isinstance(tensor, Tensor)}
        # options torch.optim does not have: a torch checkpoint's groups lack them, and they
        # stay as this optimizer was built
        ours = [{k: group[k] for k in _OPTIONS if k in group} for group in self.param_groups]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for group, saved, options in zip(self.param_groups, saved_groups, ours):
            for key, value in options.items():
                if key not in saved or key in _STORAGE_OPTIONS:
                    group[key] = value
        if kept:
            by_id = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]),
                             (p for g in self.param_groups for p in g["params"])))
            for (key, name), value in kept.items():
                param = by_id.get(key)
                if param is None:  # an entry that is not a param's, kept as torch keeps it
                    continue
                if self.state[param][name].dtype != value.dtype:  # torch's cast changed it
                    self.state[param][name] = value.detach().to(device=param.device).clone()
            for param in by_id.values():
                if param in self.state:  # packed codes of a param laid out otherwise
                    self.state[param] = _quantize.from_checkpoint(param, self.state[param])
        for group in self.param_groups:
            # a state dict that went through a broadcast or JSON holds betas as a list
            group["betas"] = tuple(map(_validation.to_scalar, group["betas"]))
        self._normalize_steps()
        self._invalidate_plan()

    def _normalize_steps(self) -> None:
        normalize_steps(self)

    def _invalidate_plan(self) -> None:
        self._plan = None
        self._layout_version = getattr(self, "_layout_version", 0) + 1

    def _check_graph_capture(self, needs_new_plan: bool) -> bool:
        """Raise if this step cannot be captured; return whether a capture is under way."""
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return False
        if not all(group["capturable"] for group in self.param_groups):
            raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of "
                               f"{type(self).__name__} but param_groups' capturable is False.")
        if needs_new_plan:
            raise RuntimeError(
                "triton-adam: the params with grads (or their memory) changed, which needs new "
                "device tables, and tables cannot be built during CUDA graph capture; run one "
                "eager step with the same params and grads before capturing")
        return True

    def _signature(self, grads_by_group):
        # local addresses: a DTensor's data_ptr() is 0, its local shard's is where it lives (and
        # moves when FSDP2 or a checkpoint load swaps the shard)
        return (self._layout_version, tuple(
            (group_flags(group), tuple(local(p).data_ptr() if g is not None else -1
                                       for p, g in zip(group["params"], grads)))
            for group, grads in zip(self.param_groups, grads_by_group)))

    def _build_plan(self, grads_by_group, signature) -> StepPlan:
        """Validate everything, create missing state, and build the device tables.

        New state is stored only once the plan is built, so a refused step leaves no trace.
        """
        for gi, (group, grads) in enumerate(zip(self.param_groups, grads_by_group)):
            for pi, (param, grad) in enumerate(zip(group["params"], grads)):
                _validation.check_param(gi, pi, param)
                if grad is not None:
                    _validation.check_grad(gi, pi, param, grad)
        self._normalize_steps()
        states, new_states, rewrites = {}, {}, []
        for gi, (group, grads) in enumerate(zip(self.param_groups, grads_by_group)):
            for pi, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                state = self.state.get(param)
                prepared, rewrite = prepared_state(gi, pi, param, group, state)
                prepared = tracked(prepared)  # its changes count (see _tracked_state)
                if prepared is not state:
                    new_states[param] = prepared
                if rewrite is not None:
                    rewrites.append((param, rewrite))
                states[param] = prepared
        plan = StepPlan(self, grads_by_group, states, signature)
        for param, state in new_states.items():
            self.state[param] = state
        for param, rewrite in rewrites:
            local(param).copy_(rewrite)
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step over every param with a grad.

        Args:
            closure (callable, optional): re-evaluates the model and returns the loss.
        """
        if torch.compiler.is_compiling() and not _differentiable.any_group(self):
            # the whole step as one opaque custom op in the graph (see _compile)
            return _compile.compiled_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steady = self._plan.steady if self._plan is not None else None
        gathered = steady.bucket_grads(self) if steady is not None else None
        if gathered is None:
            self._checked_step()
        else:
            self._steady_step(steady, *gathered)
        return loss

    def _steady_step(self, steady, bucket_grads, moved_ptrs) -> None:
        """Launch with the plan as it is: ``steady`` confirmed that nothing but the grads'
        contents (and perhaps their objects and addresses) changed since a checked step."""
        if steady.no_grad_positions:
            # every step with a missing grad, as on the checked path
            _validation.check_reachable(
                self, [[p.grad for p in group["params"]] for group in self.param_groups])
        capturing = self._check_graph_capture(needs_new_plan=False)
        if capturing and self._plan not in self._captured_plans:
            self._captured_plans.append(self._plan)
        try:
            steady.point_buckets(self._plan, moved_ptrs)
            self._plan.launch(self, bucket_grads, getattr(self, "grad_scale", None),
                              getattr(self, "found_inf", None))
        except BaseException:
            self._plan = None
            raise

    def _checked_step(self) -> None:
        """The step with every check: the plan rebuilt if anything it depends on changed,
        every grad validated; then what it saw is recorded for the steady steps after it."""
        grads_by_group = [[p.grad for p in group["params"]] for group in self.param_groups]
        differentiable = None
        if _differentiable.any_group(self):
            # torch's differentiable Adam for those groups, after the plan's (see _differentiable)
            differentiable = _differentiable.DifferentiableStep(
                self, grads_by_group, getattr(self, "grad_scale", None),
                getattr(self, "found_inf", None))
            if differentiable.covers_all:
                differentiable.run()
                return
            grads_by_group = _differentiable.grads_for_plan(self, grads_by_group)
        if any(g is None for grads in grads_by_group for g in grads):
            # at every step with a missing grad, not only when the tables change: a model
            # whose params were all replaced leaves the tables as they were (no grads before
            # and after)
            _validation.check_reachable(self, grads_by_group)
        signature = self._signature(grads_by_group)
        needs_new_plan = (self._plan is None or self._plan.signature != signature
                          or not self._plan.state_unchanged(self))
        capturing = self._check_graph_capture(needs_new_plan)
        if needs_new_plan:
            self._plan = None
            self._plan = self._build_plan(grads_by_group, signature)
        if capturing and self._plan not in self._captured_plans:
            # A captured graph replays with this plan's device tables: keep them alive even if
            # a later eager step builds new ones.
            self._captured_plans.append(self._plan)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        try:
            try:
                bucket_grads = self._plan.run(self, grads_by_group, grad_scale, found_inf)
            except GradDtypeChanged:
                # float32 grads of 16-bit params where there were 16-bit ones (or back): the
                # kernels specialise on the grad dtype; nothing was launched yet
                self._check_graph_capture(needs_new_plan=True)
                self._plan = self._build_plan(grads_by_group, signature)
                bucket_grads = self._plan.run(self, grads_by_group, grad_scale, found_inf)
        except BaseException:
            # a refused step (a bad grad, a failed collective) leaves no half-prepared plan:
            # the next step checks everything again
            self._plan = None
            raise
        if differentiable is not None:
            differentiable.run()
        else:
            # (a step with differentiable groups is for meta-learning, not speed: always checked)
            self._plan.steady = SteadyStep(self, self._plan, bucket_grads)


# triton-adam's own group options (beyond torch.optim.Adam/AdamW's)
_OPTIONS = ("eps_mode", "bias_correction", "weight_decay_mode", "state_dtype", "master_weights",
            "kahan_summation", "stochastic_rounding", "seed", "min_quantized_numel",
            "quant_block_size")
# those that say how the state is held, not what the step computes: a loaded checkpoint is
# converted to them rather than overriding them
_STORAGE_OPTIONS = ("state_dtype", "master_weights", "kahan_summation", "stochastic_rounding",
                    "min_quantized_numel", "quant_block_size")


def _snapshot(state: dict, live: dict) -> dict:
    """``state`` (a form of the ``live`` state, some of its tensors new copies: decoded
    moments, a dense master) with the tensors it shares with ``live`` copied too.

    torch's state dict holds the live states: kept while training goes on, it follows them.
    One that holds a copy of some tensors must copy them all, or a dict kept for later holds
    the step count (or master) of a later step beside the moments of this one.
    """
    shared = {id(value) for value in live.values() if isinstance(value, Tensor)}
    return {key: value.clone() if id(value) in shared else value
            for key, value in state.items()}


class Adam(_FusedAdamBase):
    """Adam (Kingma & Ba) with torch.optim.Adam's arguments and results, fused into one launch.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 backend="auto", max_grad_norm=None, skip_nonfinite=False, eps_mode="torch",
                 bias_correction=True, weight_decay_mode="torch", state_dtype=None,
                 master_weights=False, kahan_summation=False, stochastic_rounding=False,
                 seed=0, min_quantized_numel=_quantize.MIN_QUANTIZED_NUMEL,
                 quant_block_size=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay, backend=backend,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         eps_mode=eps_mode, bias_correction=bias_correction,
                         weight_decay_mode=weight_decay_mode, state_dtype=state_dtype,
                         master_weights=master_weights, kahan_summation=kahan_summation,
                         stochastic_rounding=stochastic_rounding, seed=seed,
                         min_quantized_numel=min_quantized_numel,
                         quant_block_size=quant_block_size)


class AdamW(_FusedAdamBase):
    """AdamW (Loshchilov & Hutter) with torch.optim.AdamW's arguments and results, fused.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, backend="auto", max_grad_norm=None,
                 skip_nonfinite=False, eps_mode="torch", bias_correction=True,
                 weight_decay_mode="torch", state_dtype=None,
                 master_weights=False, kahan_summation=False, stochastic_rounding=False,
                 seed=0, min_quantized_numel=_quantize.MIN_QUANTIZED_NUMEL,
                 quant_block_size=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         eps_mode=eps_mode, bias_correction=bias_correction,
                         weight_decay_mode=weight_decay_mode, state_dtype=state_dtype,
                         master_weights=master_weights, kahan_summation=kahan_summation,
                         stochastic_rounding=stochastic_rounding, seed=seed,
                         min_quantized_numel=min_quantized_numel,
                         quant_block_size=quant_block_size)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.state = TrackedStateTable(self.state)  # see _tracked_state
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


Adam.__doc__ += _COMMON_DOC.format(
    wd_doc="L2 penalty added to the gradient (or, with decoupled_weight_decay=True, the "
           "AdamW decay ``p *= 1 - lr * weight_decay``).\n"
           "        decoupled_weight_decay (bool): behave as AdamW.")
AdamW.__doc__ += _COMMON_DOC.format(
    wd_doc="decoupled decay, ``p *= 1 - lr * weight_decay`` before the Adam update.")

__all__ = ["Adam", "AdamW", "interpreter_enabled"]
