"""Compact 3D U-Net and its physics-aware variant (physics-informed segmentation paper, section 2.3).

The physics branch is two fully connected layers of ten units fed with the sequence-parameter
vector (values and their negative exponentials, see ``bidsapp.models.tissue.PARAMETER_LAYOUT``);
its output enters the network right after the last skip connection, i.e. at full resolution just
before the final convolution block. The network without the branch (``n_params=0``) is the paper's
ablation and the fallback used when parameters are missing or the sequence is one the model was not
trained on.

A spatially constant channel only shifts a convolution's output by a constant, which instance
normalisation would subtract again and so erase the physics information. Two ways of keeping it are
available (``physics_injection``):

* ``"concat"`` (the paper's): the branch output is broadcast and concatenated as extra channels, and
  the block that consumes them has no normalisation before its first activation (so it differs from
  the same block of the ablation);
* ``"norm_shift"`` (the shipped model's): the block is the ablation's block, and the physics channels'
  contribution to its first convolution (a 1x1x1 convolution of broadcast channels, i.e. a linear map
  of the branch output) is added after that convolution's instance normalisation. With that map at
  zero the network is exactly its ablation, so a physics model can start from a trained ablation and
  learn only what the parameters add (zero-initialised conditioning, as in ControlNet); see
  ``scanbridge-train tissue --physics-from-base``.

Other ways (a FiLM gain, conditioning in every block, a family-gated trunk) were trained and not shipped;
docs/notebook/tissue-models.md records what they did. Larger networks (nnU-Net style: deeper, wider,
deep supervision) extend this by subclassing and overriding ``make_block``/``make_down``/``make_up`` or
by passing more ``features``.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import PointwiseConv3d

INJECTIONS = ("concat", "norm_shift")
"""How the physics channels enter the network (see the module docstring)."""


class ConvBlock(nn.Sequential):
    """(conv 3x3x3 -> instance norm -> leaky ReLU) x 2."""

    def __init__(self, cin: int, cout: int, norm_first: bool = True):
        layers: list[nn.Module] = [nn.Conv3d(cin, cout, 3, padding=1, bias=True)]
        if norm_first:
            layers.append(nn.InstanceNorm3d(cout, affine=True))
        layers += [nn.LeakyReLU(0.01, inplace=True),
                   nn.Conv3d(cout, cout, 3, padding=1, bias=True),
                   nn.InstanceNorm3d(cout, affine=True),
                   nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class PhysicsConvBlock(ConvBlock):
    """The ablation's :class:`ConvBlock` plus the physics channels, added after the first normalisation.

    Parameter names of the convolutions and norms are those of :class:`ConvBlock`, so a trained
    ablation's weights load into it unchanged; ``inject`` (the physics channels' 1x1x1 weights) starts
    at zero.
    """

    def __init__(self, cin: int, cout: int, n_physics: int):
        super().__init__(cin, cout, norm_first=True)
        self.inject = nn.Linear(n_physics, cout, bias=False)
        nn.init.zeros_(self.inject.weight)

    def forward(self, x: torch.Tensor, physics: torch.Tensor) -> torch.Tensor:
        return self.finish(self.stem(x), physics)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The first convolution and its normalisation: the part the parameters do not reach, shared by
        every parameter vector of a sweep (:meth:`UNet3D.forward_each`)."""
        return self[1](self[0](x))

    def finish(self, y: torch.Tensor, physics: torch.Tensor) -> torch.Tensor:
        """The rest of the block on :meth:`stem`'s output, under the branch output ``physics``."""
        y = y + self.inject(physics)[:, :, None, None, None]
        return self[5](self[4](self[3](self[2](y))))


class PhysicsBranch(nn.Module):
    """Two FC layers (``units`` each) on a standardised parameter vector.

    ``center``/``scale`` are fixed buffers (set from the training parameter ranges) so the raw,
    physically meaningful vector is what callers pass, while the layers see values of order one.
    """

    def __init__(self, n_params: int, units: int = 10):
        super().__init__()
        self.register_buffer("center", torch.zeros(n_params))
        self.register_buffer("scale", torch.ones(n_params))
        self.fc = nn.Sequential(nn.Linear(n_params, units), nn.LeakyReLU(0.01, inplace=True),
                                nn.Linear(units, units), nn.LeakyReLU(0.01, inplace=True))

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        return self.fc((params - self.center) / self.scale)


class UNet3D(nn.Module):
    """3D U-Net; ``n_params > 0`` adds the physics branch.

    Input spatial size must be divisible by ``2 ** (len(features) - 1)``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4,
                 features: tuple[int, ...] = (8, 16, 32, 64), n_params: int = 0,
                 physics_units: int = 10, physics_injection: str = "concat"):
        super().__init__()
        if physics_injection not in INJECTIONS:
            raise ValueError(f"physics_injection must be one of {', '.join(INJECTIONS)}, not {physics_injection!r}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           features=list(features), n_params=n_params, physics_units=physics_units)
        if physics_injection != "concat":
            self.config["physics_injection"] = physics_injection
        self.physics_injection = physics_injection
        f = list(features)
        self.encoders = nn.ModuleList()
        cin = in_channels
        for c in f:
            self.encoders.append(self.make_block(cin, c))
            cin = c
        self.downs = nn.ModuleList(self.make_down(c) for c in f[:-1])
        self.ups = nn.ModuleList(self.make_up(f[i + 1], f[i]) for i in reversed(range(len(f) - 1)))
        self.physics = PhysicsBranch(n_params, physics_units) if n_params > 0 else None
        concat = physics_units if n_params > 0 and physics_injection == "concat" else 0
        self.decoders = nn.ModuleList()
        for i in reversed(range(len(f) - 1)):
            last = i == 0
            if last and n_params > 0 and physics_injection != "concat":
                self.decoders.append(PhysicsConvBlock(2 * f[i], f[i], physics_units))
            else:
                self.decoders.append(self.make_block(2 * f[i] + (concat if last else 0), f[i],
                                                     norm_first=not (last and concat)))
        self.head = PointwiseConv3d(f[0], out_channels)

    # extension points -------------------------------------------------------------------------
    def make_block(self, cin: int, cout: int, norm_first: bool = True) -> nn.Module:
        return ConvBlock(cin, cout, norm_first=norm_first)

    def make_down(self, c: int) -> nn.Module:
        return nn.MaxPool3d(2)

    def make_up(self, cin: int, cout: int) -> nn.Module:
        return nn.ConvTranspose3d(cin, cout, 2, stride=2)

    # ------------------------------------------------------------------------------------------
    @property
    def uses_physics(self) -> bool:
        return self.physics is not None

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.encoders) - 1)

    def forward(self, x: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_top(self.forward_shared(x), params)

    def forward_each(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (a batch of windows of one image) under each row of ``params``, concatenated
        along channels.

        Sweeping hypothetical parameters over one image (protocol bridging) runs the parameter-free
        trunk once and only :meth:`forward_top` per vector; with ``norm_shift`` the last block's first
        convolution, which the parameters do not reach either, runs once too (2/3 of that block's work).
        """
        shared = self.forward_shared(x)
        last = self.decoders[-1]
        if self.physics is not None and isinstance(last, PhysicsConvBlock):
            stem = last.stem(shared)
            return torch.cat([self.head(last.finish(stem, self._branch(params[k:k + 1], shared)))
                              for k in range(params.shape[0])], dim=1)
        return torch.cat([self.forward_top(shared, params[k:k + 1]) for k in range(params.shape[0])], dim=1)

    def _branch(self, params: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if params is None:
            raise ValueError("this network has a physics branch: pass the sequence-parameter vector")
        p = self.physics(params.to(x.dtype))
        return p.expand(x.shape[0], -1) if p.shape[0] != x.shape[0] else p

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to the last skip concatenation (the parameters enter after it)."""
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.downs):
                skips.append(x)
                x = self.downs[i](x)
        n = len(self.decoders)
        for j, (up, dec) in enumerate(zip(self.ups, self.decoders)):
            x = torch.cat([up(x), skips.pop()], dim=1)
            if j < n - 1:
                x = dec(x)
        return x

    def forward_top(self, shared: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate the broadcast physics channels, run the last decoder block and the head."""
        x = shared
        if self.physics is not None:
            p = self._branch(params, x)
            if self.physics_injection != "concat":
                return self.head(self.decoders[-1](x, p))
            x = torch.cat([x, p[:, :, None, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return self.head(self.decoders[-1](x))

    def physics_parameters(self) -> list[nn.Parameter]:
        """The weights only a physics network has (the branch and, with ``norm_shift``, its injection)."""
        if self.physics is None:
            return []
        inject = [prm for name, prm in self.named_parameters() if name.rsplit(".", 2)[-2] == "inject"]
        return list(self.physics.parameters()) + inject

    def load_ablation(self, state: dict) -> None:
        """Start a ``norm_shift`` physics network from its trained ablation's weights: everything but the
        branch and the (zero) injection weights is copied, so both networks give the same output until
        training changes the injection."""
        if self.physics is None or self.physics_injection == "concat":
            raise ValueError("load_ablation needs a physics network with the norm_shift injection")
        self.load_weights(state, ablation=True)

    def load_weights(self, state: dict, ablation: bool = False) -> list[str]:
        """Load ``state``, which with ``ablation`` may lack the branch and the injection weights. Injection
        weights it lacks are set to zero (the branch keeps its random start, unseen while the injection is
        zero), so the network starts with that state's output. Returns the names ``state`` lacked."""
        what = "ablation" if ablation else "weights"
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even when not strict
            raise ValueError(f"not this network's {what}: {str(exc).splitlines()[-1].strip()}") from None
        allowed = [k for k in missing if ablation and (k.endswith(".inject.weight") or k.startswith("physics."))]
        if unexpected or len(allowed) != len(missing):
            raise ValueError(f"not this network's {what}: missing "
                             f"{sorted(set(missing) - set(allowed))}, unexpected {sorted(unexpected)}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k in missing:
                if k.endswith(".inject.weight"):
                    params[k].zero_()
        return sorted(missing)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
