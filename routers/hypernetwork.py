"""A Text-to-LoRA / HyperFormer-style generator: from a task description, emit a LoRA for every target module.

    generator = am.train_generator(library, steps=800)            # reconstruction of the library's adapters
    generator.save(library, "t2l")                                 # with the library (safetensors + config)
    adapter = am.generate_adapter(generator, "Rewrite a date as year/month/day")
    library.add(adapter); am.compose(model, library, am.FixedRouter({adapter.name: 1.0}))

Input: the description's sentence embedding (the library's encoder, unit row) concatenated with a learned
layer embedding and a learned module-kind embedding; a shared MLP trunk; per module kind, two linear heads
emit A (r, d_in) and B (d_out, r). One generator serves every layer of a kind.

Training matches the stored adapters' updates dW = s·B·A, not their raw factors (factors are defined only up
to an invertible r x r map): per module the loss is ||B_g A_g - dW||_F^2 / ||dW||_F^2, computed from r x r
products (never forming d_out x d_in). Inputs are each adapter's description embedding and each of its
example prompts' embeddings (several views of one target), with a little embedding noise.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from tqdm.auto import tqdm

from ..library.adapter import LoraAdapter, LoraModule
from ..library.errors import BaseModelMismatchError

__all__ = ["LoraGenerator", "train_generator", "generate_adapter"]

_LAYER = re.compile(r"\.(\d+)\.")


def _kind_and_layer(module: str) -> tuple[str, int]:
    found = _LAYER.search(module)
    if not found:
        return module, 0
    return module[:found.start()] + ".{}." + module[found.end():], int(found.group(1))


class LoraGenerator(nn.Module):
    """Args: shapes: module -> (d_out, d_in) of the target modules; rank of the generated adapters; text_dim:
    the sentence encoder's width; hidden, emb: trunk and embedding widths."""

    def __init__(self, shapes: dict[str, tuple[int, int]], *, rank: int = 4, text_dim: int = 384,
                 hidden: int = 256, emb: int = 32):
        super().__init__()
        if not shapes:
            raise ValueError("LoraGenerator needs at least one target module")
        self.config = {"shapes": {m: list(s) for m, s in sorted(shapes.items())}, "rank": rank,
                       "text_dim": text_dim, "hidden": hidden, "emb": emb}
        self.modules_by_kind: dict[str, list[tuple[str, int]]] = {}
        for module in sorted(shapes):
            kind, layer = _kind_and_layer(module)
            self.modules_by_kind.setdefault(kind, []).append((module, layer))
        self.kinds = sorted(self.modules_by_kind)
        n_layers = 1 + max(layer for entries in self.modules_by_kind.values() for _, layer in entries)
        self.layer_embedding = nn.Embedding(n_layers, emb)
        self.kind_embedding = nn.Embedding(len(self.kinds), emb)
        self.trunk = nn.Sequential(nn.Linear(text_dim + 2 * emb, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.heads_A, self.heads_B = nn.ModuleDict(), nn.ModuleDict()
        for i, kind in enumerate(self.kinds):
            d_out, d_in = shapes[self.modules_by_kind[kind][0][0]]
            key = f"k{i}"
            self.heads_A[key] = nn.Linear(hidden, rank * d_in)
            self.heads_B[key] = nn.Linear(hidden, d_out * rank)
            for head, fan in ((self.heads_A[key], d_in), (self.heads_B[key], rank)):
                nn.init.normal_(head.weight, std=0.02 / fan ** 0.5)
                nn.init.zeros_(head.bias)
        self.rank = rank
        self.register_buffer("trained", torch.tensor(False), persistent=True)
        self.base_fingerprint: str | None = None
        self.base_name: str = ""
        self.encoder = None
        self.final_loss: float | None = None       # last training step's loss (train_generator)

    def forward(self, text: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text (batch, text_dim) -> module -> (A (batch, r, d_in), B (batch, d_out, r))."""
        out = {}
        batch = text.shape[0]
        for i, kind in enumerate(self.kinds):
            entries = self.modules_by_kind[kind]
            layers = torch.tensor([layer for _, layer in entries], device=text.device)
            features = torch.cat([
                text[:, None, :].expand(-1, len(entries), -1),
                self.layer_embedding(layers)[None].expand(batch, -1, -1),
                self.kind_embedding(torch.full((len(entries),), i, device=text.device))[None].expand(batch, -1, -1),
            ], dim=-1)                                                                   # (batch, M, in)
            hidden = self.trunk(features)
            d_out, d_in = self.config["shapes"][entries[0][0]]
            A = self.heads_A[f"k{i}"](hidden).view(batch, len(entries), self.rank, d_in)
            B = self.heads_B[f"k{i}"](hidden).view(batch, len(entries), d_out, self.rank)
            for j, (module, _) in enumerate(entries):
                out[module] = (A[:, j], B[:, j])
        return out

    # -- saved with the library ------------------------------------------------------------------

    def save(self, library, name: str):
        if not bool(self.trained):
            raise ValueError("this generator is untrained: train_generator(...) first")
        metadata = {"kind": "lora_generator", "config": self.config, "base_fingerprint": self.base_fingerprint,
                    "base_name": self.base_name}
        return library.save_artifact(name, self.state_dict(), metadata)

    @classmethod
    def load(cls, library, name: str) -> "LoraGenerator":
        tensors, metadata = library.load_artifact(name)
        if metadata.get("kind") != "lora_generator":
            raise ValueError(f"artifact {name!r} holds no LoRA generator")
        if metadata.get("base_fingerprint") != library.base_model.fingerprint:
            raise BaseModelMismatchError(f"generator {name!r} was trained for another base model "
                                         f"({metadata.get('base_name')!r}) than this library's "
                                         f"({library.base_model.name!r})")
        config = metadata["config"]
        generator = cls({m: tuple(s) for m, s in config["shapes"].items()}, rank=config["rank"],
                        text_dim=config["text_dim"], hidden=config["hidden"], emb=config["emb"])
        generator.load_state_dict(tensors)
        generator.base_fingerprint, generator.base_name = metadata["base_fingerprint"], metadata.get("base_name", "")
        generator.encoder = library.encoder
        return generator


def _targets(library, names: list[str], modules: list[str]):
    """Per module: stacked true factors (N, r_max, d_in), (N, d_out, r_max) with the scale folded into B,
    and ||dW||_F^2 (N,)."""
    adapters = [library.get(n) for n in names]
    targets = {}
    for module in modules:
        present = [a.modules.get(module) for a in adapters]
        r = max(f.rank for f in present if f is not None)
        d_out, d_in = library.base_model.modules[module][:2]
        A = torch.zeros(len(names), r, d_in)
        B = torch.zeros(len(names), d_out, r)
        for e, f in enumerate(present):
            if f is not None:
                A[e, :f.rank] = f.A.float()
                B[e, :, :f.rank] = f.B.float() * f.scale
        gram = torch.einsum("nor,nos->nrs", B, B)                                 # B^T B
        norm = torch.einsum("nrs,nsr->n", gram, A @ A.transpose(1, 2))            # ||B A||^2
        targets[module] = (A, B, norm.clamp_min(1e-12))
    return targets


def reconstruction_loss(generated, targets, index: torch.Tensor) -> torch.Tensor:
    """Mean over modules and rows of ||B_g A_g - dW||^2 / ||dW||^2, from r x r products."""
    losses = []
    for module, (Ag, Bg) in generated.items():
        At, Bt, norm = (t[index] for t in targets[module])
        gen_sq = torch.einsum("brs,bsr->b", Bg.transpose(1, 2) @ Bg, Ag @ Ag.transpose(1, 2))
        cross = torch.einsum("brs,bsr->b", Bg.transpose(1, 2) @ Bt, At @ Ag.transpose(1, 2))
        losses.append((gen_sq - 2 * cross + norm) / norm)
    return torch.stack(losses).mean()


def train_generator(library, names: list[str] | None = None, *, steps: int = 800, lr: float = 1e-3,
                    rank: int | None = None, hidden: int = 256, noise: float = 0.02, seed: int = 0,
                    progress: bool = True) -> LoraGenerator:
    """Train a generator to reproduce the library's adapters (or `names`) from their texts."""
    names = library.names() if names is None else list(names)
    if len(names) < 2:
        raise ValueError(f"train_generator needs at least 2 adapters, got {len(names)}")
    records = [library.record(n) for n in names]
    views, owners = [], []
    for e, record in enumerate(records):
        texts = [t for t in (record.description, *record.examples) if t.strip()]
        if not texts:
            raise ValueError(f"adapter {record.name!r} has no description or example prompts to learn from")
        views += texts
        owners += [e] * len(texts)
    torch.manual_seed(seed)
    text = torch.from_numpy(library.encoder.encode(views)).float()                  # (V, text_dim)
    owners = torch.tensor(owners)
    modules = sorted({m for n in names for m in library.get(n).modules})
    shapes = {m: tuple(library.base_model.modules[m][:2]) for m in modules}
    rank = rank or max(library.get(n).max_rank for n in names)
    generator = LoraGenerator(shapes, rank=rank, text_dim=text.shape[1], hidden=hidden)
    targets = _targets(library, names, modules)
    optimiser = torch.optim.Adam(generator.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in tqdm(range(steps), desc="train generator", disable=not progress):
        noisy = text + noise * torch.randn_like(text)
        noisy = noisy / noisy.norm(dim=1, keepdim=True)
        loss = reconstruction_loss(generator(noisy), targets, owners)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    generator.trained.fill_(True)
    generator.base_fingerprint, generator.base_name = library.base_model.fingerprint, library.base_model.name
    generator.encoder = library.encoder
    generator.final_loss = float(loss.detach())
    return generator.eval()


@torch.no_grad()
def generate_adapter(generator: LoraGenerator, description: str, *, name: str | None = None,
                     examples: tuple[str, ...] = ()) -> LoraAdapter:
    """A LoraAdapter for `description` (addable to a library of the same base model, composable, fusable,
    exportable to PEFT)."""
    if not isinstance(description, str) or not description.strip():
        raise ValueError("generate_adapter needs a non-empty description")
    if not bool(generator.trained) or generator.encoder is None:
        raise ValueError("this generator is untrained: train_generator(...) or LoraGenerator.load(...) first")
    text = torch.from_numpy(generator.encoder.encode([description])).float()
    factors = generator(text)
    modules = {m: LoraModule(A[0].clone(), B[0].clone(), alpha=float(generator.rank)) for m, (A, B) in factors.items()}
    slug = re.sub(r"[^a-z0-9]+", "_", description.lower()).strip("_")[:40] or "generated"
    return LoraAdapter(name=name or f"gen_{slug}", base_model=generator.base_name, modules=modules,
                       description=description, examples=tuple(examples), tags=("generated",),
                       source=f"generate_adapter({description!r})")
