"""The replacement model: a language model whose MLPs are read through transcoders.

    rm = ReplacementModel.from_pretrained("path/to/model", "path/to/transcoders")
    ids = rm.tokenize("The capital of France is")        # [pos], BOS first
    run = rm.run(ids)        # clean pass: logits, transcoder inputs, activations, errors
    logits = rm(ids)         # replacement pass: every MLP output = reconstruction + error
    with rm.frozen(ids) as lin:                        # frozen model (DESIGN.md §5)
        out = lin.forward(writes={2: delta})

At every layer the MLP block's output is `reconstruction + error`, where the
reconstruction is what the transcoder decodes from its features (plus its skip path)
and `error = mlp_out − reconstruction` is taken from the clean pass and held constant.
So the replacement pass reproduces the original logits (up to float rounding), while
features are recomputed from the residual stream it actually sees — which is what
lets an intervention on one feature propagate to later features.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from wiremap.errors import WiremapError
from wiremap.models.adapters import Adapter, get_adapter, get_module
from wiremap.models.frozen import FrozenModel, freeze
from wiremap.models.hooks import capture, splice_mlp_out
from wiremap.models.loading import model_max_length

# (layer, activations [batch, pos, F]) -> edited activations
FeatureEdit = Callable[[int, Tensor], Tensor]


@dataclass
class ReplacementRun:
    """Everything the clean pass of one prompt computes (batch dimension dropped)."""

    input_ids: Tensor  # [pos]
    logits: Tensor  # [pos, vocab]
    reads: Tensor  # [L, pos, d] transcoder inputs
    mlp_outs: Tensor  # [L, pos, d] what each MLP block added to the residual
    activations: Tensor  # [L, pos, F] sparse COO feature activations
    errors: Tensor  # [L, pos, d] mlp_out − reconstruction (skip path included)
    resid0: Tensor  # [pos, d] input of the first layer (the token nodes' write)


class ReplacementModel(nn.Module):
    """A Hugging Face causal LM plus transcoders for every one of its MLP layers."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        transcoders: nn.Module,
        adapter: Adapter | None = None,
        *,
        model_name: str | None = None,
        transcoders_path: str | None = None,
        check_model_name: bool = True,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter or get_adapter(model)
        self.model_name = model_name or getattr(model, "name_or_path", None) or "model"
        self.transcoders_path = transcoders_path
        check_transcoders(self.model, self.adapter, transcoders, self.model_name, check_model_name)
        self.transcoders = transcoders.to(device=self.device).eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        transcoders: str | Path | nn.Module,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        check_model_name: bool = True,
        lazy: bool = False,
    ) -> ReplacementModel:
        """Load the LM (hub name or folder) and transcoders (folder or a loaded object)."""
        from wiremap.models.loading import load_model, resolve_device, resolve_dtype

        model, tokenizer = load_model(model_name_or_path, dtype=dtype, device=device)
        path = None
        if not isinstance(transcoders, nn.Module):
            from wiremap.models.io import load_transcoders

            path = str(transcoders)
            transcoders = load_transcoders(
                transcoders, device=resolve_device(device), dtype=resolve_dtype(dtype), lazy=lazy
            )
        return cls(
            model,
            tokenizer,
            transcoders,
            model_name=str(model_name_or_path),
            transcoders_path=path,
            check_model_name=check_model_name,
        )

    # -- sizes -----------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def d_model(self) -> int:
        return self.adapter.d_model(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_hook(self) -> str:
        return self.transcoders.input_hook

    @property
    def max_length(self) -> int | None:
        return model_max_length(self.model)

    # -- tokens ----------------------------------------------------------------------
    def tokenize(self, prompt: str) -> Tensor:
        """`prompt` -> token ids [pos] with BOS first; WiremapError if empty or too long."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise WiremapError("the prompt is empty; give some text to attribute")
        body = self.tokenizer(prompt, add_special_tokens=False).input_ids
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = self.tokenizer.eos_token_id
        ids = ([bos] if bos is not None else []) + list(body)
        limit = self.max_length
        if limit is not None and len(ids) > limit:
            raise WiremapError(
                f"the prompt is {len(ids)} tokens (with BOS) but the model's context is {limit}; "
                "shorten the prompt"
            )
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def token_strings(self, ids: Tensor) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids.reshape(-1)]

    # -- transcoder math (per layer) -------------------------------------------------
    def skip(self, layer: int, x: Tensor) -> Tensor:
        """The transcoder's skip path at `layer` (zeros without one)."""
        tc = self.transcoders
        return tc.skip_layer(x.to(tc.dtype), layer).to(x.dtype)

    def encode(self, layer: int, x: Tensor) -> Tensor:
        tc = self.transcoders
        return tc.encode_layer(x.to(tc.dtype), layer)

    def decode_layer(self, acts: dict[int, Tensor], layer: int) -> Tensor:
        """Σ_{i ≤ layer} W_dec^{i→layer} a^i + b_dec^layer from activations `acts[i] [..., F]`."""
        tc = self.transcoders
        out = tc.b_dec(layer)
        for src, a in acts.items():
            offset = layer - src
            if 0 <= offset < tc.n_out(src):
                out = out + _decode_part(tc, src, a, offset)
        return out

    # -- passes ----------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: Tensor) -> ReplacementRun:
        """Clean forward pass: logits, transcoder inputs/outputs, activations and errors."""
        ids = _as_batch(input_ids)
        with capture(
            self.model, [self.input_hook, "mlp_out", "resid_pre"], adapter=self.adapter
        ) as c:
            logits = self.model(input_ids=ids).logits[0]
        reads = torch.stack([c[self.input_hook][i][0] for i in range(self.n_layers)])
        outs = torch.stack([c["mlp_out"][i][0] for i in range(self.n_layers)])
        acts = {i: self.encode(i, reads[i]) for i in range(self.n_layers)}
        recon = torch.stack([self.decode_layer(acts, i) for i in range(self.n_layers)])
        recon = recon + torch.stack([self.skip(i, reads[i]) for i in range(self.n_layers)])
        return ReplacementRun(
            input_ids=ids[0],
            logits=logits,
            reads=reads,
            mlp_outs=outs,
            activations=torch.stack([acts[i] for i in range(self.n_layers)]).to_sparse(),
            errors=outs - recon.to(outs.dtype),
            resid0=c["resid_pre"][0][0],
        )

    def forward(
        self,
        input_ids: Tensor,
        errors: Tensor | None = None,
        edit: FeatureEdit | None = None,
        activations_out: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """Replacement pass: logits [pos, vocab] with each MLP output = recon + error.

        `errors [L, pos, d]` default to those of the clean pass of `input_ids`; positions
        past them (during generation) use the live MLP's error. `edit(layer, a)` may change
        the activations computed from the live residual before they are decoded; the
        edited activations are stored in `activations_out` when given.
        """
        ids = _as_batch(input_ids)
        if errors is None:
            errors = self.run(ids[0]).errors
        store = {} if activations_out is None else activations_out
        with torch.no_grad(), self._replacement_hooks(errors, edit, store):
            return self.model(input_ids=ids).logits[0]

    def _replacement_hooks(self, errors: Tensor, edit: FeatureEdit | None, store: dict):
        raw: dict[int, Tensor] = {}  # unedited activations (for live errors)

        def splice(layer: int, x: Tensor, out: Tensor) -> Tensor:
            raw[layer] = a = self.encode(layer, x)
            live = _live_errors(self, layer, out, x, raw, errors)
            store[layer] = edit(layer, a) if edit is not None else a
            return (self.decode_layer(store, layer) + self.skip(layer, x)).to(out.dtype) + live

        return splice_mlp_out(self.model, splice, self.input_hook, adapter=self.adapter)

    # -- frozen model ---------------------------------------------------------------
    @contextmanager
    def frozen(self, input_ids: Tensor) -> Iterator[FrozenModel]:
        """Freeze the model around `input_ids` (DESIGN.md §5); see `wiremap.models.frozen`."""
        skip = self.skip if self.transcoders.has_skip else None
        with freeze(
            self.model,
            _as_batch(input_ids),
            adapter=self.adapter,
            input_hook=self.input_hook,
            skip=skip,
        ) as lin:
            yield lin

    def linearised(self, input_ids: Tensor):
        """Deprecated name of `frozen` (goes away in the next version)."""
        warnings.warn(
            "ReplacementModel.linearised is renamed ReplacementModel.frozen",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.frozen(input_ids)

    def unembed_weight(self) -> Tensor:
        """[vocab, d] rows read from the final norm's output."""
        return get_module(self.model, self.adapter.unembed).weight

    def softcap(self, logits: Tensor) -> Tensor:
        """The model's final logit soft-capping (identity when it has none).

        Only for pre-cap logits, such as the frozen model's `lin.logits(final)`: the logits the
        model returns (`run`, `forward`) are already capped by its own forward pass.
        """
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap


def _live_errors(rm, layer, out, x, raw, errors) -> Tensor:
    """Clean-pass errors on the prompt; the live MLP's error on positions beyond it."""
    n_known = errors.shape[1]
    err = errors[layer][: out.shape[-2]].to(out.dtype).unsqueeze(0)
    if out.shape[-2] <= n_known:
        return err
    # generation: error of the live MLP at new positions, from unedited activations
    recon = (rm.decode_layer(raw, layer) + rm.skip(layer, x)).to(out.dtype)
    tail = (out - recon)[..., n_known:, :]
    return torch.cat([err.expand(out.shape[0], -1, -1), tail], dim=-2)


def _decode_part(tc, src: int, a: Tensor, offset: int) -> Tensor:
    """Σ_f a_f · W_dec^{src→src+offset}[f] using only the active features."""
    flat = a.reshape(-1, a.shape[-1])
    active = flat.abs().sum(0).nonzero().flatten()
    if active.numel() == 0:
        return torch.zeros(*a.shape[:-1], tc.d_model, dtype=a.dtype, device=a.device)
    w = tc.decoder(src, active)[:, offset, :]
    return (flat[:, active] @ w.to(a.dtype)).reshape(*a.shape[:-1], -1)


def _as_batch(input_ids: Tensor) -> Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return ids.reshape(1, -1) if ids.dim() == 1 else ids


def _same_model(a: str, b: str) -> bool:
    def key(name: str) -> str:
        return Path(str(name).rstrip("/")).name.lower()

    return key(a) == key(b)


def check_transcoders(model, adapter: Adapter, tc, model_name: str, check_name: bool) -> None:
    """WiremapError unless `tc` fits `model`: layers, d_model, hooks and (optionally) name."""
    n_layers, d_model = adapter.n_layers(model), adapter.d_model(model)
    fix = "load the transcoders trained for this model (or pass the matching --model)"
    if tc.d_model != d_model:
        raise WiremapError(
            f"the transcoders have d_model={tc.d_model} but the model has {d_model}; {fix}"
        )
    layers = list(getattr(tc, "layers", range(tc.n_layers)))
    if layers != list(range(n_layers)):
        raise WiremapError(
            f"the transcoders cover layers {layers} but the model has {n_layers} layers "
            f"(0..{n_layers - 1}); attribution needs one transcoder per MLP layer. {fix}"
        )
    if tc.input_hook not in ("mlp_in", "resid_mid") or tc.output_hook != "mlp_out":
        raise WiremapError(
            f"transcoders read {tc.input_hook!r} and write {tc.output_hook!r}; the replacement "
            "model needs input mlp_in or resid_mid and output mlp_out"
        )
    trained_for = getattr(tc, "model_name", None)
    if check_name and trained_for and not _same_model(trained_for, model_name):
        raise WiremapError(
            f"the transcoders were trained for {trained_for!r}, not {model_name!r}; {fix}, "
            "or, if the two names are the same model, pass --no-check-model-name (in "
            "Python: check_model_name=False)"
        )
