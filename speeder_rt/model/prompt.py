"""The prompt's template text (``TemplateConfig``) and its token ids; the layout the items and the template take in
the prompt is ``speeder_rt.kernels.prompt_layout``'s."""
from __future__ import annotations

from dataclasses import dataclass, field

from speeder_rt.utils.schema import NonNegativeInt, check, invalid


@dataclass
class TemplateConfig:
    """Template text, tokenized once by the backbone's tokenizer; ``fixed_ids`` when it has none."""

    prefix: str = "A user's recent items, oldest first:"
    middle: str = ". Candidate items:"
    suffix: str = ". The item the user picks next is"
    fixed_ids: dict[str, list[NonNegativeInt]] = field(
        default_factory=lambda: {"prefix": [1, 2, 3, 4], "middle": [5, 6], "suffix": [7, 8, 9], "pred": [10]}
    )

    def __post_init__(self) -> None:
        check(self)
        if sorted(self.fixed_ids) != ["middle", "pred", "prefix", "suffix"]:
            raise invalid(self, "fixed_ids", f"needs exactly the keys prefix, middle, suffix, pred; got "
                                             f"{', '.join(self.fixed_ids) or 'none'}")
        if len(self.fixed_ids["pred"]) != 1:
            raise invalid(self, "fixed_ids", f"pred must be one token id, got {self.fixed_ids['pred']}")


def template_ids(cfg: TemplateConfig, tokenizer=None) -> dict[str, list[int]]:
    """{'prefix', 'middle', 'suffix', 'pred'} -> token ids; PRED is the tokenizer's EOS (or the fixed id)."""
    if tokenizer is None:
        return {k: list(v) for k, v in cfg.fixed_ids.items()}
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    pred = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else encode(".")[-1]
    return {"prefix": encode(cfg.prefix), "middle": encode(cfg.middle), "suffix": encode(cfg.suffix), "pred": [pred]}
