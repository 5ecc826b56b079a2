"""The Speeder recommender: one MoME token per item, SPAE position cues, a scoring head over candidates.

    tokens   = MoME(features of history and candidate items)                 (one token per item)
    h_r     += P[r]  for the history item r positions from the end (``recency``);  c += candidate_embedding
    hidden   = decoder(inputs_embeds of the prompt layout, SPAE bias in every attention layer)
    scores_k = Linear(hidden[PRED]) . token(candidate_k) / sqrt(d_h)           (listwise CE over K)

At inference the MoME weights are fixed, so ``item_token_table()`` precomputes every catalog item's token
once and ``score(..., item_tokens=table)`` only gathers rows of it. The same head against the whole table
gives full-catalog top-k.

With ``attn_backend="triton"`` the whole item path runs on the fused kernels too: MoME tokens through
``item_token_projection`` (training) and the prompt through ``assemble_inputs_embeds`` (inference, one
launch from the item-token table); the other backends use the PyTorch reference path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speeder_rt.data.item_table import ItemTable
from speeder_rt.data.sequences import PAD, Samples
from speeder_rt.kernels.prompt_layout import PromptLayout, assemble_prompt, layout
from speeder_rt.model import attention
from speeder_rt.model.backbone import BackboneConfig, apply_lora, load_backbone
from speeder_rt.model.mome import MixtureOfModalityExperts
from speeder_rt.model.pretrained import PretrainedModel
from speeder_rt.model.prompt import TemplateConfig, template_ids
from speeder_rt.utils.schema import PositiveInt, check, invalid


@dataclass
class SpeederConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    modalities: list[str] = field(default_factory=lambda: ["text", "collab", "image"])  # MRC experts, one each
    d_expert: PositiveInt = 256  # hidden width of each modality expert's MLP
    max_history: PositiveInt = 50  # recency table size; longer histories are refused
    relative_bias: bool = True  # SPAE's attention bias (False: plain causal attention)
    recency: bool = True  # the recency table P added to history tokens (False: no such table, nothing added)
    attn_backend: str = "auto"  # auto: triton on CUDA, reference on CPU
    template: TemplateConfig = field(default_factory=TemplateConfig)

    def __post_init__(self) -> None:
        check(self)
        if self.attn_backend != "auto":
            attention.implementation_name(self.attn_backend)
        if self.attn_backend == "flash" and self.relative_bias:
            raise ValueError("attn_backend='flash' has no relative bias: set relative_bias: false")
        if len(set(self.modalities)) != len(self.modalities) or not self.modalities:
            raise invalid(self, "modalities", f"must be a non-empty list without repeats, got {self.modalities}")
        random_init = self.backbone.pretrained is None and self.backbone.gguf_file is None
        top_id = max(i for ids in self.template.fixed_ids.values() for i in ids) if random_init else -1
        if top_id >= self.backbone.vocab_size:
            raise invalid(self, "template", f"fixed_ids reach {top_id}, beyond backbone.vocab_size "
                                            f"{self.backbone.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" else "reference"


class SpeederModel(PretrainedModel, nn.Module):
    model_kind = "speeder"
    config_class = SpeederConfig
    # Buffers and the transformers decoder, declared for the type checker (nn.Module's attribute lookup is untyped).
    available: torch.Tensor  # bool [N, M]: the item table's availability masks
    enabled: torch.Tensor  # bool [M]: the modalities the current MPO stage enables
    template: torch.Tensor  # int64: the template's token ids, prefix + middle + suffix + pred
    decoder: Any  # the backbone's decoder (transformers, optionally peft-wrapped)

    def __init__(self, cfg: SpeederConfig, table: ItemTable, backbone: tuple[nn.Module, Any] | None = None) -> None:
        """``backbone``: an already built (causal LM, tokenizer or None) to use instead of loading
        ``cfg.backbone`` (a model directory builds its own from its files)."""
        super().__init__()
        missing = [m for m in cfg.modalities if m not in table.modalities]
        if missing:
            raise ValueError(f"modalities {missing} are not in the ItemTable (it has {table.modalities})")
        self.cfg = cfg
        self.item_table = table
        self.num_items = len(table)
        backend = resolve_backend(cfg.attn_backend, "cpu")
        lm: Any
        lm, tokenizer = backbone or load_backbone(cfg.backbone, attention.implementation_name(backend))
        self.tokenizer, self.lm_config = tokenizer, lm.config
        decoder = lm.get_decoder()
        self.decoder = apply_lora(decoder, cfg.backbone.lora) if cfg.backbone.lora else decoder
        hidden = lm.config.hidden_size
        self.hidden_size = hidden
        self.num_heads = lm.config.num_attention_heads
        self.num_layers = lm.config.num_hidden_layers

        dims = {m: table.width(m) for m in cfg.modalities}
        self.mome = MixtureOfModalityExperts(dims, cfg.d_expert, hidden)
        self.recency = nn.Embedding(cfg.max_history, hidden) if cfg.recency else None
        self.candidate_embedding = nn.Parameter(torch.zeros(hidden))
        if self.recency is not None:
            nn.init.normal_(self.recency.weight, std=0.02)
        heads = torch.arange(1, self.num_heads + 1, dtype=torch.float32)
        self.slopes = nn.Parameter((2.0 ** (-8.0 * heads / self.num_heads)).repeat(self.num_layers, 1))
        self.head = nn.Linear(hidden, hidden)

        for name, tensor in self.item_table_buffers().items():
            self.register_buffer(name, tensor.clone())
        self.register_buffer("enabled", torch.ones(len(cfg.modalities), dtype=torch.bool))
        ids = template_ids(cfg.template, tokenizer)
        self.template_sizes = (len(ids["prefix"]), len(ids["middle"]), len(ids["suffix"]))
        self.register_buffer("template", torch.tensor(ids["prefix"] + ids["middle"] + ids["suffix"] + ids["pred"]))
        self.to(cfg.backbone.torch_dtype)
        self.set_backend(backend)

    def item_table_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers built from the item table (``features_<m>``, ``available`` [N, M]), as the table holds them."""
        table = self.item_table
        buffers = {f"features_{m}": table.features[m] for m in self.cfg.modalities}
        buffers["available"] = torch.stack([table.available[m] for m in self.cfg.modalities], dim=1)
        return buffers

    # -- configuration -------------------------------------------------------------------------
    def set_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` (see ``speeder_rt.model.attention``)."""
        name = attention.implementation_name(backend)
        if backend == "flash" and self.cfg.relative_bias:
            raise ValueError("attn_backend='flash' has no relative bias; this model uses relative_bias=True")
        self.backend = backend
        for module in self.decoder.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name

    def set_enabled_modalities(self, modalities: list[str]) -> None:
        unknown = [m for m in modalities if m not in self.cfg.modalities]
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r}; the model has {self.cfg.modalities}")
        self.enabled.copy_(torch.tensor([m in modalities for m in self.cfg.modalities]))

    # -- item tokens ---------------------------------------------------------------------------
    @property
    def fused_item_path(self) -> bool:
        """The item path uses the Triton kernels exactly when attention does."""
        return self.backend == "triton"

    def item_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """MoME tokens [*ids.shape, d_h] for item ids (PAD -> a zero token)."""
        flat = ids.reshape(-1)
        if self.fused_item_path:
            from speeder_rt.kernels import item_token_projection, mome_parameters

            features = tuple(getattr(self, f"features_{m}") for m in self.cfg.modalities)
            active = self.available & self.enabled[None, :]
            tokens = item_token_projection(flat, features, active, *mome_parameters(self.mome), validate=False)
            return tokens.reshape(*ids.shape, -1)
        safe = flat.clamp(min=0)
        feats = {m: getattr(self, f"features_{m}")[safe] for m in self.cfg.modalities}
        active = self.available[safe] & self.enabled[None, :] & (flat >= 0)[:, None]
        tokens, _ = self.mome(feats, active)
        return tokens.reshape(*ids.shape, -1)

    @torch.no_grad()
    def item_token_table(self, chunk: int = 8192) -> torch.Tensor:
        """[N_items, d_h]: every catalog item's token, computed once for inference."""
        return torch.cat([self.item_tokens(torch.arange(a, min(a + chunk, self.num_items), device=self.available.device))
                          for a in range(0, self.num_items, chunk)])

    # -- forward -------------------------------------------------------------------------------
    def prompt(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
               item_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, PromptLayout, torch.Tensor]:
        """(inputs_embeds [B, L, d], layout, candidate item tokens [B, K, d])."""
        width = history.shape[1]
        if width > self.cfg.max_history:
            raise ValueError(f"history width {width} exceeds max_history={self.cfg.max_history}")
        template_emb = self.decoder.get_input_embeddings()(self.template)
        recency = None if self.recency is None else self.recency.weight
        if item_tokens is not None and self.fused_item_path and not torch.is_grad_enabled():  # inference-only kernel
            from speeder_rt.kernels import assemble_inputs_embeds

            if recency is None:  # the kernel always adds a recency row: zero rows add nothing
                recency = item_tokens.new_zeros(max(width, 1), item_tokens.shape[1])
            embeds, _, _ = assemble_inputs_embeds(
                item_tokens, history, history_len, candidates, recency, self.candidate_embedding,
                self.template, self.decoder.get_input_embeddings().weight, self.template_sizes, validate=False)
            return embeds, layout(history_len, width, candidates.shape[1], self.template_sizes), item_tokens[candidates]
        if item_tokens is None:
            hist_tok, cand_tok = self.item_tokens(history), self.item_tokens(candidates)
        else:
            hist_tok = item_tokens[history.clamp(min=0)] * (history >= 0)[..., None].to(item_tokens.dtype)
            cand_tok = item_tokens[candidates]
        embeds, lay = assemble_prompt(hist_tok, history_len, cand_tok, recency, self.candidate_embedding, template_emb,
                                      self.template_sizes)
        return embeds, lay, cand_tok

    def pred_state(self, inputs_embeds: torch.Tensor, lay: PromptLayout) -> torch.Tensor:
        """The decoder's final hidden state at PRED through the head, scaled by d_h^-1/2 so that its dot
        product with an item token is a well-conditioned logit at any hidden size: [B, d_h]."""
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            position_ids=torch.arange(lay.length, device=inputs_embeds.device)[None].expand(inputs_embeds.shape[0], -1),
            spae_item_idx=lay.item_idx,
            spae_token_mask=lay.token_mask,
            spae_slopes=self.slopes if self.cfg.relative_bias else None,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        pred = hidden[torch.arange(hidden.shape[0], device=hidden.device), lay.pred_pos]
        return self.head(pred) * self.hidden_size**-0.5

    def forward(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
                item_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, K] (float32) of each candidate; ``item_tokens``: a precomputed table (inference)."""
        self.check_inputs(history, history_len, candidates)
        embeds, lay, cand_tok = self.prompt(history, history_len, candidates, item_tokens)
        query = self.pred_state(embeds, lay)
        return torch.einsum("bd,bkd->bk", query.float(), cand_tok.float())

    def loss(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Listwise cross-entropy over the K candidates."""
        return F.cross_entropy(self(history, history_len, candidates), label)

    def catalog_scores(self, history: torch.Tensor, history_len: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """Scores [B, N] of every catalog item; the prompt carries no candidates."""
        self.check_inputs(history, history_len, history[:, :0])
        empty = torch.zeros(history.shape[0], 0, dtype=torch.int64, device=history.device)
        embeds, lay, _ = self.prompt(history, history_len, empty, item_tokens)
        return self.pred_state(embeds, lay).float() @ item_tokens.float().T

    @torch.no_grad()
    def topk(self, history: torch.Tensor, history_len: torch.Tensor, k: int, item_tokens: torch.Tensor,
             exclude_history: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-catalog top-k: (item ids [B, k], scores [B, k]), the history's items excluded by default."""
        scores = self.catalog_scores(history, history_len, item_tokens)
        if exclude_history:
            # padding (and an empty history) scatters into an extra column that is dropped
            seen = torch.zeros(scores.shape[0], self.num_items + 1, dtype=torch.bool, device=scores.device)
            seen.scatter_(1, torch.where(history >= 0, history, self.num_items), True)
            seen = seen[:, : self.num_items]
            scores = scores.masked_fill(seen, float("-inf"))
            left = int((~seen).sum(1).min()) if len(seen) else self.num_items
        else:
            left = self.num_items
        if not 1 <= k <= left:
            raise ValueError(f"k={k}: must be in 1..{left} (the catalog's {self.num_items} items less each "
                             "history's own)")
        top = scores.topk(k, dim=1)
        return top.indices, top.values

    def check_inputs(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> None:
        """Shapes, then every range in one host sync: ids in the catalog, 0 <= history_len <= W."""
        if (history.ndim != 2 or candidates.ndim != 2 or history_len.shape != (history.shape[0],)
                or candidates.shape[0] != history.shape[0]):
            raise ValueError(f"history [B, W], history_len [B], candidates [B, K] expected; got {list(history.shape)}, "
                             f"{list(history_len.shape)}, {list(candidates.shape)}")
        if history.shape[0] == 0:
            return
        n = self.num_items
        cand = candidates if candidates.numel() else torch.zeros(1, dtype=torch.int64, device=history.device)
        hist = history if history.numel() else torch.zeros(1, dtype=torch.int64, device=history.device)
        real = torch.arange(history.shape[1], device=history.device)[None, :] < history_len[:, None]
        bad_cand, bad_hist, bad_len = torch.stack([
            ((cand < 0) | (cand >= n)).any(), (hist >= n).any() | (real & (history < 0)).any(),
            ((history_len < 0) | (history_len > history.shape[1])).any(),
        ]).tolist()
        if bad_cand:
            raise ValueError(f"candidate ids must be in 0..{n - 1}")
        if bad_hist:
            raise ValueError(f"history ids must be in 0..{n - 1} within history_len (negative = padding after it)")
        if bad_len:
            raise ValueError(f"history_len must be in 0..{history.shape[1]} (the history width)")

    # -- evaluation protocol -------------------------------------------------------------------
    def cached_item_token_table(self) -> torch.Tensor:
        """``item_token_table()``, recomputed only when a MoME weight, a feature or the enabled set changed
        (keyed by the tensors' storage and in-place version counters, which every optimizer step bumps)."""
        tensors = [*self.mome.parameters(), self.available, self.enabled,
                   *(getattr(self, f"features_{m}") for m in self.cfg.modalities)]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if getattr(self, "_table_key", None) != key:
            self._table, self._table_key = self.item_token_table(), key
        return self._table

    @torch.no_grad()
    def score(self, samples: Samples, candidates: torch.Tensor | None) -> torch.Tensor:
        """The ``speeder_rt.eval.protocol.Scorer`` interface (uses the precomputed item-token table)."""
        was_training = self.training
        self.eval()
        device = self.available.device
        table = self.cached_item_token_table()
        history = torch.from_numpy(samples.history).to(device)
        history_len = torch.from_numpy(samples.history_len).to(device)
        if candidates is None:
            scores = self.catalog_scores(history, history_len, table)
        else:
            scores = self(history, history_len, candidates.to(device), item_tokens=table)
        self.train(was_training)
        return scores.cpu()


def batch_tensors(samples: Samples, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(history, history_len, candidates, label) tensors of a Samples batch on ``device``."""
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return to(samples.history), to(samples.history_len), to(samples.candidates), to(samples.label)


__all__ = ["PAD", "SpeederConfig", "SpeederModel", "batch_tensors", "resolve_backend"]
