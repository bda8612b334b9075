"""The authors' ViL checkpoint format and forward pass, written for the tests straight from the spec
(shared/spec/vil-architecture.md), without using vil's code.

- `authors_state_dict`: random weights under the authors' training-code keys (v1 or v2), offsets and all.
- `to_standalone`: the same dict in the spelling of the authors' standalone files.
- `reference_forward`: logits computed directly from such a dict, with the authors' conventions (offset norms,
  eps values, the parallel stabilised mLSTM, flipped odd sub-blocks, bilateral pooling).
"""

import math

import torch
import torch.nn.functional as F

NUM_HEADS = 4


def authors_state_dict(
    version: int,
    dim: int,
    depth: int,
    grid: tuple[int, int],
    num_classes: int = 10,
    patch: int = 8,
    in_chans: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random tensors with the keys and shapes of the authors' training-code checkpoints."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)

    inner = 2 * dim
    bias = version == 2
    sd = {
        "patch_embed.proj.weight": rand(dim, in_chans, patch, patch, std=0.1),
        "patch_embed.proj.bias": rand(dim),
        "pos_embed.embed": rand(1, grid[0], grid[1], dim, std=0.5),
    }
    for j in range(depth):
        p = f"xlstm.blocks.{j}."
        sd[p + "xlstm_norm.weight"] = rand(dim, std=0.1)  # offset: effective scale 1 + w
        if bias:
            sd[p + "xlstm_norm.bias"] = rand(dim)
        sd[p + "xlstm.proj_up.weight"] = rand(2 * inner, dim, std=1 / math.sqrt(dim))
        if bias:
            sd[p + "xlstm.proj_up.bias"] = rand(2 * inner)
        for name in ("q_proj", "k_proj", "v_proj"):
            sd[p + f"xlstm.{name}.weight"] = rand(inner // 4, 4, 4, std=0.5)
            if bias:
                sd[p + f"xlstm.{name}.bias"] = rand(inner)
        if version == 2:
            sd[p + "xlstm.conv1d.weight"] = rand(inner, 1, 3, 3, std=0.3)
            sd[p + "xlstm.conv1d.bias"] = rand(inner)
        else:
            sd[p + "xlstm.conv1d.conv.weight"] = rand(inner, 1, 4, std=0.3)
            sd[p + "xlstm.conv1d.conv.bias"] = rand(inner)
        sd[p + "xlstm.mlstm_cell.igate.weight"] = rand(NUM_HEADS, 3 * inner, std=0.1)
        sd[p + "xlstm.mlstm_cell.igate.bias"] = rand(NUM_HEADS, std=1.0)
        sd[p + "xlstm.mlstm_cell.fgate.weight"] = rand(NUM_HEADS, 3 * inner, std=0.1)
        sd[p + "xlstm.mlstm_cell.fgate.bias"] = rand(NUM_HEADS, std=1.0, mean=3.0)
        sd[p + "xlstm.mlstm_cell.outnorm.weight"] = rand(inner, std=0.1)  # offset
        if bias:
            sd[p + "xlstm.mlstm_cell.outnorm.bias"] = rand(inner)
        sd[p + "xlstm.learnable_skip"] = rand(inner, std=0.3, mean=1.0)
        sd[p + "xlstm.proj_down.weight"] = rand(dim, inner, std=1 / math.sqrt(inner))
        if bias:
            sd[p + "xlstm.proj_down.bias"] = rand(dim)
    sd["xlstm.post_blocks_norm.weight"] = rand(dim, std=0.1)  # offset
    if bias:
        sd["xlstm.post_blocks_norm.bias"] = rand(dim)
    pooled = 2 * dim if version == 2 else dim
    sd["head.0.weight"] = rand(pooled, std=0.1, mean=1.0)  # a standard LayerNorm
    sd["head.0.bias"] = rand(pooled)
    sd["head.1.weight"] = rand(num_classes, pooled)
    sd["head.1.bias"] = rand(num_classes)
    return sd


def to_standalone(sd: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Rename training-code keys to the authors' standalone-file spelling (v2: vision_lstm2.py; v1: hubconf)."""
    out = {}
    for key, value in sd.items():
        new = key
        if key.startswith("xlstm.blocks."):
            parts = key.split(".")
            j = int(parts[2])
            rest = ".".join(parts[3:])
            rest = rest.replace("xlstm_norm.", "norm.", 1) if rest.startswith("xlstm_norm.") else "layer." + rest[6:]
            if version == 2:
                rest = rest.replace("layer.conv1d.", "layer.conv.")
                direction = "rowwise_from_bot_right" if j % 2 else "rowwise_from_top_left"
                new = f"blocks.{j // 2}.{direction}.{rest}"
            else:
                new = f"blocks.{j}.{rest}"
        elif key.startswith("xlstm.post_blocks_norm."):
            new = ("norm." if version == 2 else "legacy_norm.") + key.split(".")[-1]
        elif key.startswith("head.0."):
            new = ("legacy_norm." if version == 2 else "norm.") + key.split(".")[-1]
        elif key.startswith("head.1."):
            new = "head." + key.split(".")[-1]
        out[new] = value
    return out


def _block_diag(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    B, S, E = x.shape
    y = torch.einsum("bshi,hoi->bsho", x.reshape(B, S, E // 4, 4), weight).reshape(B, S, E)
    return y if bias is None else y + bias


def _mlstm_parallel(q, k, v, igate, fgate, eps=1e-6):
    """The authors' parallel stabilised mLSTM; q, k, v [B, NH, S, DH], gates [B, NH, S, 1]."""
    B, NH, S, DH = q.shape
    log_f = F.logsigmoid(fgate)
    cum = torch.cat([torch.zeros(B, NH, 1, 1, dtype=q.dtype), torch.cumsum(log_f, dim=-2)], dim=-2)
    rep = cum.repeat(1, 1, 1, S + 1)
    mat = (rep - rep.transpose(-2, -1))[:, :, 1:, 1:]
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    log_d = torch.where(mask, mat, -float("inf")) + igate.transpose(-2, -1)
    max_log_d = log_d.max(dim=-1, keepdim=True).values
    d = torch.exp(log_d - max_log_d)
    c = (q @ (k / math.sqrt(DH)).transpose(-2, -1)) * d
    normalizer = torch.maximum(c.sum(dim=-1, keepdim=True).abs(), torch.exp(-max_log_d))
    return (c / (normalizer + eps)) @ v


def reference_forward(
    sd: dict[str, torch.Tensor],
    x: torch.Tensor,
    version: int,
    stride: int | None = None,
    pre_logits: bool = False,
) -> torch.Tensor:
    """Logits of the authors' model, computed directly from their training-code state dict."""
    dim = sd["patch_embed.proj.weight"].shape[0]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    inner = 2 * dim
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("xlstm.blocks."))
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride or patch)
    B, _, h, w = x.shape
    x = x.permute(0, 2, 3, 1)
    pos = sd["pos_embed.embed"]
    if pos.shape[1:3] != (h, w):
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
    x = (x + pos).reshape(B, h * w, dim)
    S = h * w
    for j in range(depth):
        p = f"xlstm.blocks.{j}."
        t = F.layer_norm(x, (dim,), 1 + sd[p + "xlstm_norm.weight"], sd.get(p + "xlstm_norm.bias"), eps=1e-5)
        if j % 2 == 1:
            t = t.flip(1)
        p += "xlstm."
        up = F.linear(t, sd[p + "proj_up.weight"], sd.get(p + "proj_up.bias"))
        x_m, z = up[..., :inner], up[..., inner:]
        if version == 2:
            grid = x_m.transpose(1, 2).reshape(B, inner, h, w)
            conv = F.conv2d(grid, sd[p + "conv1d.weight"], sd[p + "conv1d.bias"], padding=1, groups=inner)
            x_c = conv.reshape(B, inner, S).transpose(1, 2)
        else:
            conv = F.conv1d(
                x_m.transpose(1, 2), sd[p + "conv1d.conv.weight"], sd[p + "conv1d.conv.bias"], padding=3, groups=inner
            )
            x_c = conv[..., :-3].transpose(1, 2)
        x_c = F.silu(x_c)
        q = _block_diag(x_c, sd[p + "q_proj.weight"], sd.get(p + "q_proj.bias"))
        k = _block_diag(x_c, sd[p + "k_proj.weight"], sd.get(p + "k_proj.bias"))
        v = _block_diag(x_m, sd[p + "v_proj.weight"], sd.get(p + "v_proj.bias"))
        gate_in = torch.cat([q, k, v], dim=-1)
        igate = F.linear(gate_in, sd[p + "mlstm_cell.igate.weight"], sd[p + "mlstm_cell.igate.bias"])
        fgate = F.linear(gate_in, sd[p + "mlstm_cell.fgate.weight"], sd[p + "mlstm_cell.fgate.bias"])

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, S, NUM_HEADS, -1).transpose(1, 2)

        hs = _mlstm_parallel(
            heads(q), heads(k), heads(v), igate.transpose(1, 2).unsqueeze(-1), fgate.transpose(1, 2).unsqueeze(-1)
        )
        hs = F.group_norm(
            hs.transpose(1, 2).reshape(B * S, inner),
            NUM_HEADS,
            1 + sd[p + "mlstm_cell.outnorm.weight"],
            sd.get(p + "mlstm_cell.outnorm.bias"),
            eps=1e-5,
        ).reshape(B, S, inner)
        out = F.linear(
            (hs + sd[p + "learnable_skip"] * x_c) * F.silu(z), sd[p + "proj_down.weight"], sd.get(p + "proj_down.bias")
        )
        if j % 2 == 1:
            out = out.flip(1)
        x = x + out
    x = F.layer_norm(
        x, (dim,), 1 + sd["xlstm.post_blocks_norm.weight"], sd.get("xlstm.post_blocks_norm.bias"), eps=1e-5
    )
    pooled = torch.cat([x[:, 0], x[:, -1]], dim=-1) if version == 2 else (x[:, 0] + x[:, -1]) / 2
    pooled = F.layer_norm(pooled, (pooled.shape[-1],), sd["head.0.weight"], sd["head.0.bias"], eps=1e-6)
    if pre_logits:
        return pooled
    return F.linear(pooled, sd["head.1.weight"], sd["head.1.bias"])


def save_authors_file(path, sd: dict[str, torch.Tensor], **ctor_kwargs) -> None:
    """torch.save in the authors' file layout: {"state_dict": ..., "ctor_kwargs": ..., ...}."""
    torch.save({"state_dict": sd, "ctor_kwargs": ctor_kwargs, "epoch": 400, "abs_ckpt": {"epoch": 400}}, path)
