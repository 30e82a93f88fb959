"""The transformers runtime: the only code that touches a model.

One :class:`Runtime` per steered model holds the edits of every active handle and installs them, one
installer per edit kind (`steer.backends.transformers.installers`). Any change (a new handle, a removed one)
uninstalls everything and installs the union again, so the installed state is always a function of the
active handles. When the last handle goes, the model is exactly as it was: hooks removed, wrappers and layer
tags deleted, the text config's ``_attn_implementation`` restored.

Per call it keeps, per thread: the :class:`~steer.edits.context.ForwardFacts` of the current forward (captured
by a pre-hook on the top-level model), the call's :class:`~steer.edits.context.CallStore` (from its prefill
on) and the current *run*: ``"main"`` (the caller's forward), an auxiliary run's key (``"owner/name"``,
`steer.edits.kinds.SourceRun`), or None (every edit off: ``handle.disabled()``, projections steer makes
itself).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steer.backends.lifecycle import HandleRuntime
from steer.backends.transformers import attention as attention_fn
from steer.backends.transformers.images import ImageMetadata
from steer.backends.transformers.masks import padding_from_mask
from steer.backends.transformers.runs import run_key
from steer.backends.transformers.wrappers import is_compiled
from steer.edits.context import CallStore, EditContext, ForwardFacts
from steer.edits.kinds import MAIN, Edit
from steer.errors import ImageLayoutError, MissingImageTokensError

if TYPE_CHECKING:
    from steer.adapters.base import Adapter

_RUNTIME_ATTR = "_steer_runtime"
_PREFILL_INPUT_KEYS = ("image_grid_thw", "image_sizes", "pixel_values", "mm_token_type_ids", "video_grid_thw")


class TensorSite:
    """One hook on one module point (a decoder layer's input or output, an MLP's output) that runs the
    tensor edits of that point in order (`steer.backends.transformers.installers.tensor_sites`)."""

    def __init__(self, layer: int, point: str) -> None:
        self.layer = layer
        self.point = point
        self.ops: list[Callable[[torch.Tensor, str], torch.Tensor | None]] = []


class Runtime(HandleRuntime):
    """All steer state attached to one model."""

    attr = _RUNTIME_ATTR

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        super().__init__(model)
        self.model = model
        self.adapter = adapter
        self.info = adapter.info
        self.attention_edits: dict[int, list[Edit]] = {}
        self.images = ImageMetadata()
        self._hooks: list[Any] = []
        self._tagged: list[nn.Module] = []
        self._saved_impl: tuple[Any, Any] | None = None
        self._wrapped: list[tuple[Any, str, bool, Any]] = []
        self._sites: dict[tuple[int, str, str], TensorSite] = {}
        self._runs: dict[int, frozenset[str]] = {}
        self.methods_needing_images: list[str] = []
        self.whole_prefill: list[str] = []
        self._shared: dict[str, Any] = {}

    def edits(self) -> list[Edit]:
        return [e for h in self.handles for e in h.edits]

    # ---- per-thread call state --------------------------------------------------------------------
    @property
    def context(self) -> ForwardFacts:
        """The facts of the current forward call in this thread."""
        ctx = getattr(self._local, "context", None)
        if ctx is None:
            ctx = self._local.context = ForwardFacts()
        return ctx

    @context.setter
    def context(self, value: ForwardFacts) -> None:
        self._local.context = value

    @property
    def run(self) -> str | None:
        """The current run in this thread: ``"main"``, an auxiliary run's key, or None (every edit off)."""
        if self.bypassed:
            return None
        return getattr(self._local, "run", MAIN)

    @contextlib.contextmanager
    def running(self, run: str | None, facts: ForwardFacts | None = None) -> Iterator[None]:
        """Within the block the current run is ``run`` (None: every edit off) and, when given, the facts
        edits see are ``facts``."""
        old_run = getattr(self._local, "run", MAIN)
        old_ctx = getattr(self._local, "context", None)
        self._local.run = run
        if facts is not None:
            self._local.context = facts
        try:
            yield
        finally:
            self._local.run = old_run
            if facts is not None:
                self._local.context = old_ctx

    @property
    def main_rows(self) -> int | None:
        """In a forward that carries a batched auxiliary branch after the caller's rows: how many rows are the
        caller's (edits act on those only); None otherwise."""
        return getattr(self._local, "main_rows", None)

    @contextlib.contextmanager
    def stacked(self, rows: int) -> Iterator[None]:
        """Within the block the forward's first ``rows`` rows are the caller's, the rest a branch's."""
        old = getattr(self._local, "main_rows", None)
        self._local.main_rows = rows
        try:
            yield
        finally:
            self._local.main_rows = old

    @property
    def in_forward(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def pending_call(self) -> CallStore | None:
        """The store of a call that has started before its prefill (a pruned ``generate``), if any."""
        return getattr(self._local, "pending", None)

    def new_pending_call(self) -> CallStore:
        """Start a call before its prefill: its store, adopted by the next prefill in this thread."""
        pending = self._local.pending = CallStore()
        return pending

    def clear_pending(self) -> None:
        self._local.pending = None

    def call_store(self, last: bool = False) -> CallStore:
        """The store of the current call: the forward's, or (outside a forward) the pending one; with no pending
        call, a new store, or with ``last`` the store of the last call in this thread."""
        if self.in_forward:
            return self.context.call
        pending = self.pending_call()
        if pending is not None:
            return pending
        return self.context.call if last else CallStore()

    def active(self, edit: Edit, phase: str, run: str | None = None) -> bool:
        """Whether ``edit`` acts now: its runs include the current run and its phase matches."""
        run = self.run if run is None else run
        if run is None:
            return False
        runs = self._runs.get(id(edit))
        if runs is None:
            runs = frozenset(run_key(edit.owner, r) for r in edit.runs)
        return run in runs and (edit.phase == "all" or edit.phase == phase)

    def edit_context(
        self,
        edit: Edit,
        layer: int | None = None,
        query_len: int | None = None,
        key_len: int | None = None,
        facts: ForwardFacts | None = None,
    ) -> EditContext:
        return EditContext(
            forward=facts if facts is not None else self.context,
            model=self.info,
            layer=layer,
            query_len=query_len,
            key_len=key_len,
            run=self.run or MAIN,
            owner=edit.owner,
            edit_id=id(edit),
        )

    # ---- what installers use --------------------------------------------------------------------------
    def add_hook(self, handle: Any) -> None:
        """Keep a removable hook handle (removed on uninstall)."""
        self._hooks.append(handle)

    def wrap(self, target: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``target.name`` by ``make(original)`` as an instance attribute until uninstall."""
        original = getattr(target, name)
        had = name in target.__dict__
        self._wrapped.append((target, name, had, target.__dict__.get(name)))
        target.__dict__[name] = functools.wraps(original)(make(original))

    def tensor_site(self, site: str, layer: int) -> TensorSite:
        """The dispatcher of one module point (created, with its hook, on first use)."""
        module, point = self.adapter.module_for(site, layer)
        key = (id(module), point, "site")
        dispatcher = self._sites.get(key)
        if dispatcher is None:
            dispatcher = self._sites[key] = TensorSite(layer, point)
            self.add_hook(_register_site_hook(module, dispatcher, self))
        return dispatcher

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """Installer state shared by the edits of one kind (e.g. one hook serving every Positions edit);
        made on first use, dropped on uninstall."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def add_attention_edit(self, layer: int, edit: Edit) -> None:
        """Have steer's attention function run ``edit`` on decoder layer ``layer``."""
        self.attention_edits.setdefault(layer, []).append(edit)

    # ---- install / uninstall ----------------------------------------------------------------------------
    def _reinstall(self) -> None:
        self._uninstall()
        if self.handles:
            self._install()
        if is_compiled(self.model):
            _reset_compiled_code()

    def _install(self) -> None:
        from steer.backends.transformers.installers import install, ordered

        model = self.model
        self.methods_needing_images = [n for h in self.handles for n in h.methods_needing_images]
        self.whole_prefill = [n for h in self.handles for n in h.whole_prefill]
        edits = self.edits()
        self._runs = {id(e): frozenset(run_key(e.owner, r) for r in e.runs) for e in edits}
        self.add_hook(model.register_forward_pre_hook(self._capture_context, with_kwargs=True))
        self.add_hook(model.register_forward_hook(self._leave_forward, always_call=True))
        self.images.install(self)
        self._note_generation(model)
        for edit in ordered(edits):
            install(self, edit)
        self.wrap(model, "generate", self._wrap_generate)  # outermost: pruning's wrapper runs inside it
        if self.attention_edits:
            attention_fn.register()
            config = self.adapter.attention_config
            original = config._attn_implementation_internal
            self._saved_impl = (config, original)
            backend = original if original and original != attention_fn.IMPLEMENTATION else "sdpa"
            attention_fn.set_original_backend(config, backend)
            config._attn_implementation_internal = attention_fn.IMPLEMENTATION
            for layer in self.attention_edits:
                module = self.adapter.attention(layer)
                # nn.Module.__setattr__ is typed for Tensor | Module values; this is a plain attribute
                module._steer_layer = attention_fn.LayerTag(self, layer)  # type: ignore[assignment]
                self._tagged.append(module)

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for target, name, had, previous in reversed(self._wrapped):
            if had:
                target.__dict__[name] = previous
            else:
                target.__dict__.pop(name, None)
        self._wrapped.clear()
        for module in self._tagged:
            module.__dict__.pop("_steer_layer", None)
        self._tagged.clear()
        self.attention_edits = {}
        self._sites = {}
        self._shared = {}
        if self._saved_impl is not None:
            config, original = self._saved_impl
            config._attn_implementation_internal = original
            attention_fn.forget_original_backend(config)
            self._saved_impl = None
        self.images.clear()
        for name in ("context", "run", "pending", "depth", "main_rows", "generation"):
            self._local.__dict__.pop(name, None)

    def _note_generation(self, model: nn.Module) -> None:
        """Note the decoding settings of each ``generate`` call (the :class:`ForwardFacts` ``generation`` fact):
        ``generate`` resolves its config once, before the prefill, in ``_prepare_generation_config``."""
        if not hasattr(model, "_prepare_generation_config"):  # pragma: no cover - every generative model has it
            return

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def prepare(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                config = out[0] if isinstance(out, tuple) else out
                self._local.generation = {
                    "do_sample": bool(getattr(config, "do_sample", False)),
                    "num_beams": int(getattr(config, "num_beams", 1) or 1),
                    "num_return_sequences": int(getattr(config, "num_return_sequences", 1) or 1),
                }
                return out

            return prepare

        self.wrap(model, "_prepare_generation_config", make)

    # ---- per-forward context --------------------------------------------------------------------------
    def _leave_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._local.depth = max(getattr(self._local, "depth", 1) - 1, 0)
        self.exit_call()

    def _wrap_generate(self, original: Any) -> Any:
        def generate(*args: Any, **kwargs: Any) -> Any:
            """The caller's generate, counted as one call in flight (no handle may change under it)."""
            self.enter_call()
            try:
                return original(*args, **kwargs)
            finally:
                self.exit_call()

        return generate

    def _capture_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        self.enter_call()
        if self.bypassed:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return
        batch, q_len = reference.shape[0], reference.shape[1]
        padding = padding_from_mask(kwargs.get("attention_mask"), past + q_len)
        keep = kwargs.get("logits_to_keep", 0)
        if past == 0:
            inputs = {k: kwargs[k] for k in _PREFILL_INPUT_KEYS if kwargs.get(k) is not None}
            layout = None
            if input_ids is not None:
                images = self.adapter.images_from_inputs(kwargs)
                if images is None:
                    images = self.images.from_encoded(self.adapter, kwargs.get("mm_encoder_outputs"))
                layout = self.adapter.image_layout(input_ids, images)
            call = self.pending_call() or CallStore()
            self.clear_pending()
            self.context = ForwardFacts(
                phase="prefill",
                batch_size=batch,
                query_len=q_len,
                past_length=0,
                prompt_ids=input_ids,
                image_layout=layout,
                padding_mask=padding,
                inputs=inputs,
                logits_to_keep=keep,
                generation=self._local.__dict__.pop("generation", None),
                call=call,
            )
            self._check_image_tokens()
        else:
            ctx = self.context
            ctx.phase = "decode"
            ctx.batch_size = batch
            ctx.query_len = q_len
            ctx.past_length = past
            ctx.padding_mask = padding
            ctx.logits_to_keep = keep
            ctx.forward_index += 1
            ctx.derived = {}
            if self.whole_prefill and input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] > 1:
                if bool(self.adapter.image_token_mask(input_ids).any()):
                    raise ImageLayoutError(
                        f"{', '.join(self.whole_prefill)} needs each image block inside one prefill call; this call "
                        "continues a cache with image tokens (chunked prefill). Prefill the whole prompt in one call."
                    )

    def _check_image_tokens(self) -> None:
        needing = self.methods_needing_images
        if not needing:
            return
        ctx = self.context
        if ctx.image_mask is None:
            raise MissingImageTokensError(
                f"{', '.join(needing)} needs to know where the image tokens are, but the model was called with "
                "inputs_embeds only. Call it (or generate) with input_ids from the processor."
            )
        missing = [b for b in range(ctx.batch_size) if not bool(ctx.image_mask[b].any())]
        if missing:
            raise MissingImageTokensError(
                f"{', '.join(needing)} works on image tokens, but prompt row(s) {missing} contain none "
                f"(token id {self.adapter.image_token_id}). Put the image placeholder in the prompt (the "
                "processor expands it), pass images to the processor, or remove the method for text-only prompts."
            )


def _reset_compiled_code() -> None:
    """Rebuild compiled code on the next call: Dynamo does not guard module hooks, so without this edits applied
    after ``torch.compile`` would not act and removed ones would linger."""
    import warnings

    import torch._dynamo

    warnings.warn(
        "steer: the model runs torch.compile'd code; steer reset Dynamo's caches so that applying or removing "
        "edits takes effect (the next call recompiles; other compiled functions in this process too). Apply steer "
        "before compiling to avoid the recompilation.",
        UserWarning,
        stacklevel=4,
    )
    torch._dynamo.reset()


def _register_site_hook(module: nn.Module, site: TensorSite, runtime: Runtime) -> Any:
    """One hook running ``site.ops`` on the module's first input or its output."""
    if site.point == "input":

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if runtime.run is None or not site.ops:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            if x is None:
                return None
            new = _run_ops(site, x, runtime)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module: nn.Module, args: tuple, output: Any) -> Any:
        if runtime.run is None or not site.ops:
            return None
        x = output[0] if isinstance(output, tuple) else output
        new = _run_ops(site, x, runtime)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(post)


def _run_ops(site: TensorSite, x: torch.Tensor, runtime: Runtime) -> torch.Tensor | None:
    rows = runtime.main_rows
    if rows is not None and x.shape[0] > rows:  # a batched branch's rows follow the caller's: left unedited
        new = _run_ops_on(site, x[:rows], runtime)
        return None if new is None else torch.cat([new, x[rows:]], dim=0)
    return _run_ops_on(site, x, runtime)


def _run_ops_on(site: TensorSite, x: torch.Tensor, runtime: Runtime) -> torch.Tensor | None:
    phase = runtime.context.phase
    changed = False
    for op in site.ops:
        new = op(x, phase)
        if new is not None:
            x, changed = new, True
    return x if changed else None


__all__ = ["Runtime", "TensorSite"]
