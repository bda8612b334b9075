"""Patch embedding, the 2D position-embedding grid and the input checks in front of them."""

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_function, resample_patch_embed, to_2tuple
from torch import nn


@register_notrace_function
@torch.jit.ignore
def check_image(
    x: torch.Tensor,
    in_chans: int,
    img_size: tuple[int, int],
    patch_size: tuple[int, int],
    stride: tuple[int, int],
    strict_img_size: bool,
) -> None:
    """Raise a ValueError that names the problem and the fix when `x` is not a batch of images the model takes."""
    if x.ndim != 4:
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(f"VisionLSTM expects images of shape [B, C, H, W], got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"VisionLSTM was built for {in_chans}-channel images but got {x.shape[1]} channels (shape "
            f"{tuple(x.shape)}); convert the images or create the model with in_chans={x.shape[1]}"
        )
    height, width = int(x.shape[2]), int(x.shape[3])
    if strict_img_size and (height, width) != tuple(img_size):
        raise ValueError(
            f"VisionLSTM was built for {img_size[0]}x{img_size[1]} images but got {height}x{width}; create it with "
            f"img_size=({height}, {width}), call model.set_input_size(img_size=({height}, {width})), or create it "
            f"with dynamic_img_size=True to accept any size"
        )
    for name, size, patch, step in (
        ("height", height, patch_size[0], stride[0]),
        ("width", width, patch_size[1], stride[1]),
    ):
        if size < patch or (size - patch) % step != 0:
            ok = max(patch, patch + round((size - patch) / step) * step)
            raise ValueError(
                f"image {name} {size} does not tile into patches of {patch} with stride {step}: ({name} - {patch}) "
                f"must be a non-negative multiple of {step}; resize or pad the images (e.g. to {ok})"
            )


@register_notrace_function
def resample_pos_embed(pos_embed: torch.Tensor, grid_size: list[int]) -> torch.Tensor:
    """Bicubic resampling of a position-embedding grid [1, H, W, D] to [1, grid_size[0], grid_size[1], D].

    No antialiasing, as in the authors' code, so that resampled checkpoints compute what their model computes.
    Interpolation runs in at least float32 (bicubic is not implemented for every low-precision dtype on every device).
    """
    if pos_embed.shape[1] == grid_size[0] and pos_embed.shape[2] == grid_size[1]:
        return pos_embed
    grid = pos_embed.permute(0, 3, 1, 2).to(torch.promote_types(pos_embed.dtype, torch.float32))  # [1, D, H, W]
    grid = F.interpolate(grid, size=(grid_size[0], grid_size[1]), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).to(pos_embed.dtype)


# Plain torch.fx.symbolic_trace treats these as leaves too (timm's tracer uses register_notrace_function).
torch.fx.wrap("check_image")
torch.fx.wrap("resample_pos_embed")


def _grid_size(img_size: tuple[int, int], patch_size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    return (img_size[0] - patch_size[0]) // stride[0] + 1, (img_size[1] - patch_size[1]) // stride[1] + 1


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, D, kernel=patch_size, stride=stride) returning a channels-last token grid [B, H', W', D].

    The grid is what the ViL blocks work on: the 3x3 convolution needs the (H', W') layout of the actual input.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 192,
        strict_img_size: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.img_size: tuple[int, int] = to_2tuple(img_size)
        self.patch_size: tuple[int, int] = to_2tuple(patch_size)
        self.stride: tuple[int, int] = to_2tuple(stride if stride is not None else patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        for size, patch in zip(self.img_size, self.patch_size):
            if size < patch:
                raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        self.grid_size: tuple[int, int] = _grid_size(self.img_size, self.patch_size, self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        """Xavier-uniform on the weight seen as a [D, C * kh * kw] matrix (as an nn.Linear); bias 0."""
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (H', W') for an image of size img_size."""
        return _grid_size(img_size, self.patch_size, self.stride)

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
    ) -> None:
        """Change the nominal image size and/or the patch size (the kernel is resampled, as timm's PatchEmbed)."""
        if patch_size is not None:
            new_patch = to_2tuple(patch_size)
            if new_patch != self.patch_size:
                if self.stride != self.patch_size:
                    raise ValueError(
                        f"set_input_size: cannot change patch_size of an overlapping patch embedding "
                        f"(patch {self.patch_size}, stride {self.stride}); create a new model instead"
                    )
                with torch.no_grad():
                    weight = resample_patch_embed(self.proj.weight, list(new_patch), verbose=False)
                self.proj.weight = nn.Parameter(weight, requires_grad=self.proj.weight.requires_grad)
                self.proj.kernel_size = new_patch
                self.proj.stride = new_patch
                self.patch_size = new_patch
                self.stride = new_patch
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
        self.grid_size = _grid_size(self.img_size, self.patch_size, self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H', W', D]."""
        check_image(x, self.in_chans, self.img_size, self.patch_size, self.stride, self.strict_img_size)
        return self.proj(x).permute(0, 2, 3, 1)
