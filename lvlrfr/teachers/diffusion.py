"""Diffusion super-resolution teacher: an SR3-style conditional DDPM whose encoder features are distillation targets.

The UNet (diffusers ``UNet2DModel``) reads 6 channels: the noisy HR face ``x_t`` followed by the VLR face
resized to the UNet's sample size, concatenated along channels as in SR3 (Saharia et al., "Image
Super-Resolution via Iterative Refinement", 2021). It predicts the noise epsilon. Stage 0a trains it
with :meth:`DiffusionSRTeacher.training_loss`. Stage 1 reads its encoder (down blocks and middle block) at a
fixed timestep and fixed noise through :meth:`DiffusionSRTeacher.encode`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import huggingface_hub.constants
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Down blocks whose outputs `encode` can tap, with the up block that mirrors each. The Skip* blocks are
# left out because their skip convolution reads 3 input channels and this UNet reads 6.
UP_BLOCK_FOR_DOWN_BLOCK = {
    "DownBlock2D": "UpBlock2D",
    "AttnDownBlock2D": "AttnUpBlock2D",
    "ResnetDownsampleBlock2D": "ResnetUpsampleBlock2D",
}
RESIZE_KERNELS = ("nearest", "bilinear", "bicubic", "area")
TEACHER_CONFIG_NAME = "lvlrfr_teacher.json"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resize_images(images: Tensor, size: int, kernel: str) -> Tensor:
    """Resize ``(B, 3, H, W)`` images in [-1, 1] to ``(B, 3, size, size)`` with ``kernel``.

    Shrinking with "bilinear" or "bicubic" widens the kernel to the scale factor (PyTorch's antialias). The result is clamped to
    [-1, 1] because bicubic interpolation overshoots at edges. Images already at ``size`` are returned as is.
    """
    if kernel not in RESIZE_KERNELS:
        raise ValueError(f"invalid resize kernel {kernel!r}, expected one of {RESIZE_KERNELS}")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrinking = images.shape[-1] > size or images.shape[-2] > size
    if kernel in ("bilinear", "bicubic"):
        resized = F.interpolate(images, size=(size, size), mode=kernel, align_corners=False, antialias=shrinking)
    else:
        resized = F.interpolate(images, size=(size, size), mode=kernel)
    return resized.clamp(-1.0, 1.0)


def build_sr_unet(
    sample_size: int,
    block_out_channels: list[int] | tuple[int, ...],
    layers_per_block: int,
    down_block_types: list[str] | tuple[str, ...] | None,
    norm_num_groups: int,
    attention_head_dim: int,
) -> UNet2DModel:
    """Build the 6-in, 3-out UNet. By default only the last (lowest-resolution) down block has attention."""
    if down_block_types is None:
        down_block_types = ["DownBlock2D"] * (len(block_out_channels) - 1) + ["AttnDownBlock2D"]
    unsupported = [name for name in down_block_types if name not in UP_BLOCK_FOR_DOWN_BLOCK]
    if unsupported:
        raise ValueError(f"down_block_types {unsupported} are not supported; use {sorted(UP_BLOCK_FOR_DOWN_BLOCK)}")
    indivisible = [channels for channels in block_out_channels if channels % norm_num_groups]
    if indivisible:
        raise ValueError(
            f"block_out_channels {indivisible} are not divisible by norm_num_groups={norm_num_groups}. "
            "Pick a norm_num_groups that divides every width"
        )
    if min(block_out_channels) < 2 * norm_num_groups:
        # ResnetBlock2D adds the time embedding per channel right before a GroupNorm, and a group of one
        # channel subtracts that constant again, so the block would not see the timestep.
        raise ValueError(
            f"norm_num_groups={norm_num_groups} leaves one channel per group at width {min(block_out_channels)}, "
            "which cancels the time embedding. Use at most half the smallest of block_out_channels"
        )
    up_block_types = [UP_BLOCK_FOR_DOWN_BLOCK[name] for name in reversed(down_block_types)]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=6,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
    )


class DiffusionSRTeacher(nn.Module):
    """SR3-style conditional diffusion model on a diffusers ``UNet2DModel`` and ``DDPMScheduler``.

    Images follow the project convention, RGB ``(B, 3, H, W)`` in [-1, 1]. The VLR input (any size, usually
    the model input size of the data module) is resized to ``sample_size`` with ``up_kernel``. The HR
    target is resized to ``sample_size`` with ``hr_kernel``, which is antialiased when it shrinks.

    Feature taps (:meth:`encode`) run the UNet encoder at ``tap_timestep``. ``down{i}`` is the output of down
    block ``i`` before its downsampler, of shape ``(block_out_channels[i], sample_size / 2**i, ...)``, and
    ``mid`` is the output of the middle block. The noisy input ``x_t`` of the taps is set by
    ``condition_on_hr``:

    - ``False`` (default): ``x_t`` is the fixed noise alone, so the taps depend on the VLR face only, which
      is also the student's input. At a ``tap_timestep`` well below ``num_train_timesteps`` pure
      noise is not what the UNet saw in training at that step. A timestep near the end of the schedule
      matches training better.
    - ``True``: ``x_t = scheduler.add_noise(HR, noise, tap_timestep)``, so the taps also carry HR detail.

    Example::

        teacher = DiffusionSRTeacher(sample_size=32, block_out_channels=[32, 64, 64]).freeze()
        taps = teacher.encode(vlr)  # {"down0": (B, 32, 32, 32), "down1": ..., "down2": ..., "mid": ...}
    """

    def __init__(
        self,
        sample_size: int = 32,
        block_out_channels: list[int] | tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 2,
        down_block_types: list[str] | tuple[str, ...] | None = None,
        norm_num_groups: int = 16,
        attention_head_dim: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        tap_timestep: int = 200,
        noise_seed: int = 0,
        condition_on_hr: bool = False,
        up_kernel: str = "bicubic",
        hr_kernel: str = "bilinear",
    ) -> None:
        super().__init__()
        unet = build_sr_unet(
            sample_size, block_out_channels, layers_per_block, down_block_types, norm_num_groups, attention_head_dim
        )
        # clip_sample keeps the predicted x_0 in [-1, 1] while sampling.
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type="epsilon",
            clip_sample=True,
        )
        self._attach(unet, scheduler, tap_timestep, noise_seed, condition_on_hr, up_kernel, hr_kernel)

    @classmethod
    def from_modules(
        cls,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        tap_timestep: int = 200,
        noise_seed: int = 0,
        condition_on_hr: bool = False,
        up_kernel: str = "bicubic",
        hr_kernel: str = "bilinear",
    ) -> DiffusionSRTeacher:
        """Wrap an existing UNet and scheduler, checking that the UNet has the SR3 layout."""
        teacher = cls.__new__(cls)
        nn.Module.__init__(teacher)
        teacher._attach(unet, scheduler, tap_timestep, noise_seed, condition_on_hr, up_kernel, hr_kernel)
        return teacher

    def _attach(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        tap_timestep: int,
        noise_seed: int,
        condition_on_hr: bool,
        up_kernel: str,
        hr_kernel: str,
    ) -> None:
        config = unet.config
        if config.in_channels != 6 or config.out_channels != 3:
            raise ValueError(
                f"the SR teacher UNet must read 6 channels (noisy HR + VLR) and write 3 (noise), got "
                f"in_channels={config.in_channels}, out_channels={config.out_channels}"
            )
        if not isinstance(config.sample_size, int):
            raise ValueError(f"the SR teacher UNet needs a square integer sample_size, got {config.sample_size!r}")
        unsupported = [name for name in config.down_block_types if name not in UP_BLOCK_FOR_DOWN_BLOCK]
        if unsupported or unet.mid_block is None or unet.class_embedding is not None:
            raise ValueError(
                f"encode() supports down blocks {sorted(UP_BLOCK_FOR_DOWN_BLOCK)}, a middle block and no class "
                f"embedding, but this UNet has down_block_types={list(config.down_block_types)}, "
                f"mid_block_type={config.mid_block_type!r}, class_embed_type={config.class_embed_type!r}"
            )
        levels = len(config.block_out_channels)
        if config.sample_size % 2 ** (levels - 1):
            raise ValueError(
                f"sample_size={config.sample_size} must be divisible by 2**{levels - 1} for "
                f"{levels} down blocks"
            )
        if not 0 <= tap_timestep < scheduler.config.num_train_timesteps:
            raise ValueError(
                f"tap_timestep={tap_timestep} must be in [0, {scheduler.config.num_train_timesteps})"
            )
        for name, kernel in (("up_kernel", up_kernel), ("hr_kernel", hr_kernel)):
            if kernel not in RESIZE_KERNELS:
                raise ValueError(f"invalid {name}={kernel!r}, expected one of {RESIZE_KERNELS}")

        self.unet = unet
        self.scheduler = scheduler
        self.tap_timestep = int(tap_timestep)
        self.noise_seed = int(noise_seed)
        # The degradation and the data module settings of the teacher's training, when its checkpoint records them.
        self.trained_degradation: dict[str, Any] | None = None
        self.trained_data: dict[str, Any] | None = None
        self.condition_on_hr = bool(condition_on_hr)
        self.up_kernel = up_kernel
        self.hr_kernel = hr_kernel
        self.frozen = False

    # Shapes and description

    @property
    def sample_size(self) -> int:
        """Side in pixels of the UNet's input and of :meth:`super_resolve`'s output."""
        return int(self.unet.config.sample_size)

    @property
    def tap_names(self) -> list[str]:
        """Names of the encoder taps, from highest to lowest resolution: ``down0``, ..., ``mid``."""
        return [f"down{index}" for index in range(len(self.unet.down_blocks))] + ["mid"]

    def tap_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Return ``{name: (C, H, W)}`` of each tap for one image."""
        channels = list(self.unet.config.block_out_channels)
        shapes = {}
        for index, width in enumerate(channels):
            side = self.sample_size // 2**index
            shapes[f"down{index}"] = (width, side, side)
        side = self.sample_size // 2 ** (len(channels) - 1)
        shapes["mid"] = (channels[-1], side, side)
        return shapes

    def describe(self) -> dict[str, Any]:
        """Return the settings that define the taps, as plain JSON types."""
        return {
            "kind": "diffusion_sr",
            "sample_size": self.sample_size,
            "conditioning": "VLR face resized to sample_size, concatenated after x_t along channels",
            "condition_on_hr": self.condition_on_hr,
            "up_kernel": self.up_kernel,
            "hr_kernel": self.hr_kernel,
            "block_out_channels": list(self.unet.config.block_out_channels),
            "down_block_types": list(self.unet.config.down_block_types),
            "num_train_timesteps": int(self.scheduler.config.num_train_timesteps),
            "tap_timestep": self.tap_timestep,
            "noise_seed": self.noise_seed,
            "taps": {name: list(shape) for name, shape in self.tap_shapes().items()},
            "parameters": sum(parameter.numel() for parameter in self.parameters()),
        }

    # Freezing

    def freeze(self) -> DiffusionSRTeacher:
        """Turn off gradients and keep the module in eval mode, also across later ``train()`` calls."""
        self.requires_grad_(False)
        self.frozen = True
        super().train(False)
        return self

    def train(self, mode: bool = True) -> DiffusionSRTeacher:
        """Set train mode, except that a frozen teacher stays in eval mode."""
        return super().train(mode and not self.frozen)

    # Inputs

    def resize_condition(self, vlr: Tensor) -> Tensor:
        """Resize the VLR input ``(B, 3, S, S)`` to ``(B, 3, sample_size, sample_size)`` with ``up_kernel``."""
        _check_images(vlr, "vlr")
        return resize_images(vlr, self.sample_size, self.up_kernel)

    def resize_target(self, hr: Tensor) -> Tensor:
        """Resize the HR face ``(B, 3, H, W)`` to ``(B, 3, sample_size, sample_size)`` with ``hr_kernel``."""
        _check_images(hr, "hr")
        return resize_images(hr, self.sample_size, self.hr_kernel)

    def tap_noise(self, batch_size: int, device: torch.device, keys: Tensor | None = None) -> Tensor:
        """Return the fixed noise ``(B, 3, sample_size, sample_size)`` of the taps.

        Without ``keys`` every image gets the same noise, drawn from a CPU generator seeded with
        ``noise_seed``, so an image's taps do not depend on its batch position or on the other images.
        With ``keys`` (``(B,)`` int64, for example the data set index), image ``i`` gets noise from a
        generator seeded with ``noise_seed`` and ``keys[i]``. The noise is drawn on the CPU and then moved,
        so it is the same on every device.
        """
        shape = (1, 3, self.sample_size, self.sample_size)
        if keys is None:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.noise_seed))
            return noise.expand(batch_size, -1, -1, -1).to(device)
        if keys.shape != (batch_size,):
            raise ValueError(f"keys must have shape ({batch_size},), got {tuple(keys.shape)}")
        draws = []
        for key in keys.tolist():
            seed = (self.noise_seed * 1_000_003 + int(key)) % 2**63
            draws.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        return torch.cat(draws).to(device)

    # Feature taps

    def encode(self, vlr: Tensor, hr: Tensor | None = None, keys: Tensor | None = None) -> dict[str, Tensor]:
        """Run the UNet encoder at ``tap_timestep`` and return the named taps.

        Args:
            vlr: ``(B, 3, S, S)`` VLR face in [-1, 1], usually up-sampled to the model input size.
            hr: ``(B, 3, H, W)`` HR face in [-1, 1], required only when ``condition_on_hr`` is True.
            keys: optional ``(B,)`` int64 per-image noise keys, see :meth:`tap_noise`.

        Returns:
            ``{name: (B, C, H, W)}`` with the names and shapes of :meth:`tap_shapes`. Gradients flow
            through the taps to ``vlr`` unless the caller runs this under ``torch.no_grad()``.
        """
        condition = self.resize_condition(vlr)
        batch_size = condition.shape[0]
        noise = self.tap_noise(batch_size, condition.device, keys).to(condition.dtype)
        timesteps = torch.full((batch_size,), self.tap_timestep, dtype=torch.long, device=condition.device)

        if self.condition_on_hr:
            if hr is None:
                raise ValueError("this teacher has condition_on_hr=True, so encode() needs the HR faces (hr=...)")
            noisy = self.scheduler.add_noise(self.resize_target(hr), noise, timesteps)
        else:
            noisy = noise
        return self._encoder_features(torch.cat([noisy, condition], dim=1), timesteps)

    def _encoder_features(self, sample: Tensor, timesteps: Tensor) -> dict[str, Tensor]:
        # Steps 0-4 of UNet2DModel.forward (diffusers 0.42): centering, time embedding, conv_in, down blocks,
        # middle block. The up path is skipped.
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        time_embedding = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))

        hidden = unet.conv_in(sample)
        taps = {}
        for index, block in enumerate(unet.down_blocks):
            hidden, states = block(hidden_states=hidden, temb=time_embedding)
            # `states` contains one entry per resnet layer and then the downsampled output. The tap is the
            # last layer's entry, at the block's input resolution.
            taps[f"down{index}"] = states[len(block.resnets) - 1]
        taps["mid"] = unet.mid_block(hidden, time_embedding)
        return taps

    # Training and sampling

    def training_loss(self, hr: Tensor, vlr: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return the DDPM epsilon-prediction MSE (scalar) at uniformly drawn timesteps.

        ``hr`` is ``(B, 3, H, W)`` and ``vlr`` ``(B, 3, S, S)``, both in [-1, 1]. A ``generator`` (on any
        device) makes the timesteps and noise reproducible, for validation.
        """
        target = self.resize_target(hr)
        condition = self.resize_condition(vlr)
        if target.shape[0] != condition.shape[0]:
            raise ValueError(f"hr has {target.shape[0]} images but vlr has {condition.shape[0]}")
        draw_device = generator.device if generator is not None else target.device
        noise = torch.randn(target.shape, generator=generator, device=draw_device).to(target)
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (target.shape[0],), generator=generator, device=draw_device
        ).to(target.device)

        noisy = self.scheduler.add_noise(target, noise, timesteps)
        predicted = self.unet(torch.cat([noisy, condition], dim=1), timesteps).sample
        return F.mse_loss(predicted, noise)

    @torch.no_grad()
    def super_resolve(
        self,
        vlr: Tensor,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        sampler: Literal["ddim", "ddpm"] = "ddim",
    ) -> Tensor:
        """Sample SR faces ``(B, 3, sample_size, sample_size)`` in [-1, 1] from VLR faces ``(B, 3, S, S)``.

        "ddim" (eta 0) is deterministic given the start noise and works with few steps. "ddpm" follows the
        training scheduler and needs more steps. Both build their scheduler from this teacher's config.
        """
        condition = self.resize_condition(vlr)
        scheduler_class = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler]
        scheduler = scheduler_class.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=condition.device)

        draw_device = generator.device if generator is not None else condition.device
        sample = torch.randn(condition.shape, generator=generator, device=draw_device).to(condition)
        for timestep in scheduler.timesteps:
            predicted = self.unet(torch.cat([sample, condition], dim=1), timestep).sample
            sample = scheduler.step(predicted, timestep, sample, generator=generator).prev_sample
        return sample.clamp(-1.0, 1.0)

    # Saving and loading

    def tap_options(self) -> dict[str, Any]:
        """Return the settings outside the diffusers configs, as written to ``lvlrfr_teacher.json``."""
        return {
            "tap_timestep": self.tap_timestep,
            "noise_seed": self.noise_seed,
            "condition_on_hr": self.condition_on_hr,
            "up_kernel": self.up_kernel,
            "hr_kernel": self.hr_kernel,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``unet/``, ``scheduler/`` (diffusers layout) and ``lvlrfr_teacher.json`` under ``folder``."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / TEACHER_CONFIG_NAME).write_text(json.dumps(self.tap_options(), indent=2) + "\n")
        logger.info("Saved the diffusion SR teacher to %s", folder)
        return folder

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, local_files_only: bool | None = None, **tap_options: Any
    ) -> DiffusionSRTeacher:
        """Load a teacher written by :meth:`save_pretrained`, from a local folder or a Hugging Face Hub id.

        ``tap_options`` (``tap_timestep``, ``noise_seed``, ...) override those in ``lvlrfr_teacher.json``.
        ``local_files_only`` defaults to the ``HF_HUB_OFFLINE`` setting. A source that cannot be loaded
        raises ``OSError`` naming the source and the local folder layout to use instead. The scheduler is
        requested only after the UNet has loaded, so an unreachable Hub fails on the first download.
        """
        path = Path(path_or_hub_id).expanduser()
        is_folder = path.is_dir()
        if is_folder:
            source = str(path)
            saved_options = path / TEACHER_CONFIG_NAME
            options = json.loads(saved_options.read_text()) if saved_options.is_file() else {}
        elif HUB_ID_PATTERN.match(str(path_or_hub_id)) and not path.exists():
            source = str(path_or_hub_id)
            options = {}
        else:
            raise FileNotFoundError(
                f"teacher folder {path} not found. Pass a folder written by DiffusionSRTeacher.save_pretrained "
                "(with unet/ and scheduler/ inside) or a Hugging Face Hub id"
            )
        options.update(tap_options)

        if local_files_only is None:
            local_files_only = huggingface_hub.constants.HF_HUB_OFFLINE
        try:
            unet = UNet2DModel.from_pretrained(
                source, subfolder="unet", local_files_only=local_files_only, low_cpu_mem_usage=False
            )
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=local_files_only)
        except OSError as error:
            if is_folder:
                where = f"folder {source}"
            elif local_files_only:
                where = f"Hub id {source!r} in offline mode (HF_HUB_OFFLINE or local_files_only)"
            else:
                where = f"Hub id {source!r} over the network"
            # NOTE: the time to fail on a network that drops packets is set by huggingface_hub's timeouts
            # (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT). Only offline mode was run here.
            raise OSError(
                f"failed to load the diffusion SR teacher from {where}: {error}\n"
                "Without network access, place a folder written by DiffusionSRTeacher.save_pretrained "
                "(containing unet/ and scheduler/) at a local path and pass that path, or train one with "
                "stage 0a (SuperResolutionTeacher) and use DiffusionSRTeacher.from_checkpoint."
            ) from error
        logger.info("Loaded the diffusion SR teacher from %s", source)
        return cls.from_modules(unet, scheduler, **options)

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str | Path) -> DiffusionSRTeacher:
        """Load the teacher of a stage 0a (``SuperResolutionTeacher``) Lightning checkpoint.

        The constructor arguments come from the ``teacher`` hyper-parameter and the weights from the
        ``teacher.``-prefixed entries of the state dict.
        """
        checkpoint_path = Path(checkpoint_path)
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_path} not found. Pass a stage 0a .ckpt file")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        teacher_args = checkpoint.get("hyper_parameters", {}).get("teacher") or {}
        prefix = "teacher."
        state = {
            key[len(prefix) :]: value
            for key, value in checkpoint.get("state_dict", {}).items()
            if key.startswith(prefix)
        }
        if not state:
            raise ValueError(
                f"{checkpoint_path} has no '{prefix}' weights in its state_dict. Pass a checkpoint of stage 0a "
                "(SuperResolutionTeacher)"
            )
        teacher = cls(**teacher_args)
        teacher.load_state_dict(state)
        teacher.trained_degradation = checkpoint.get("hyper_parameters", {}).get("degradation")
        teacher.trained_data = checkpoint.get("datamodule_hyper_parameters")
        logger.info("Loaded the diffusion SR teacher from checkpoint %s", checkpoint_path)
        return teacher


def _check_images(images: Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
