"""theta, the configuration-aware model (docs/method.md#the-configuration-aware-model).

One small MLP, shared by every quantized matrix of a backbone, maps what is known about matrix i
under configuration c - its five quantization choices, its transformer block and its module type -
to an r x r matrix U_i. The LoRA of matrix i then uses B (I + gamma * U_i) A (coalora.lora), so
theta only ever produces r x r numbers per matrix, never a whole adapter.

    config_index [N, 5] ---+
    block_index  [N]    ---+-- 7 lookups, 8-d each --> z [N, 56] -> LayerNorm -> Linear(56, 128)
    module_index [N]    ---+                              -> SiLU -> Linear(128, r*r) -> U [N, r, r]

The last layer starts near zero (weight ~ N(0, 1e-3), bias 0), so U ~ 0 and training starts from a
plain LoRA. Unlike the official code, the block and module-type tables are sized from the backbone's
layout (not a fixed 32 positions), and every matrix is evaluated in one batched call.
"""

from __future__ import annotations

import torch
from torch import nn

from coalora.configs import FIELDS, Configuration, Layout, QuantSpace


def check_layout(configuration: Configuration, layout: Layout) -> None:
    """Raise a ValueError unless `configuration` was written for exactly this backbone layout."""
    if not isinstance(configuration, Configuration):
        raise ValueError(f"expected a coalora Configuration, got {type(configuration).__name__}")
    if configuration.layout is not layout and configuration.layout != layout:
        raise ValueError(
            f"configuration is for backbone {configuration.backbone!r} ({len(configuration.layout)} matrices) but "
            f"this model was built for backbone {layout.backbone!r} ({len(layout)} matrices) with another layout; "
            f"write the configuration against the model's layout (coalora.models.matrix_layout)")


class ConfigAwareModel(nn.Module):
    """theta: configuration index rows [N, 5] -> adjustments U [N, r, r], one row per layout matrix."""

    def __init__(self, layout: Layout, space: QuantSpace, rank: int, embed_dim: int = 8, hidden: int = 128):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.layout, self.space, self.rank = layout, space, rank
        self.embed_dim, self.hidden = embed_dim, hidden
        # Seven lookup tables: the five configuration fields, then the block index and the module type.
        sizes = {**dict(zip(FIELDS, space.n_choices)),
                 "block": layout.n_blocks, "module_type": len(layout.module_types)}
        self.embeddings = nn.ModuleDict({name: nn.Embedding(n, embed_dim) for name, n in sizes.items()})
        width = embed_dim * len(sizes)  # 56
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(),
                                 nn.Linear(hidden, rank * rank))
        nn.init.normal_(self.mlp[-1].weight, std=1e-3)
        nn.init.zeros_(self.mlp[-1].bias)
        self.gamma = nn.Parameter(torch.tensor(1.0))
        # Where each matrix sits, in layout order; derived from the layout, so not saved in the state dict.
        types = layout.module_types
        self.register_buffer("block_index", torch.tensor([m.block for m in layout.matrices]), persistent=False)
        self.register_buffer("module_index", torch.tensor([types.index(m.module_type) for m in layout.matrices]),
                             persistent=False)

    def config_index(self, configuration: Configuration) -> torch.Tensor:
        """The choice indices of `configuration` as a LongTensor [N, 5] on theta's device."""
        check_layout(configuration, self.layout)
        index = configuration.encode(self.space).reshape(len(self.layout), len(FIELDS))
        return torch.as_tensor(index, device=self.block_index.device)

    def forward(self, config_index: torch.Tensor) -> torch.Tensor:
        """U [N, r, r] for all N matrices at once."""
        n = len(self.layout)
        if tuple(config_index.shape) != (n, len(FIELDS)):
            raise ValueError(f"config_index must have shape ({n}, {len(FIELDS)}) for backbone "
                             f"{self.layout.backbone!r}, got {tuple(config_index.shape)}")
        columns = [*config_index.unbind(dim=1), self.block_index, self.module_index]  # 7 x [N]
        z = torch.cat([table(col) for table, col in zip(self.embeddings.values(), columns)], dim=1)  # [N, 56]
        return self.mlp(z).view(n, self.rank, self.rank)  # [N, r, r]

    def adjustments(self, config_index: torch.Tensor) -> torch.Tensor:
        """M = I + gamma * U [N, r, r]: the matrices each LoRA applies between A and B."""
        eye = torch.eye(self.rank, device=self.gamma.device, dtype=self.gamma.dtype)
        return eye + self.gamma * self(config_index)
