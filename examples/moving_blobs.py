"""Next-frame prediction of moving blobs with a ConvLSTM (cells/convlstm.cell).

Makes its own data, in the spirit of moving MNIST: a few Gaussian blobs move at constant
velocity on a small canvas and bounce off its walls. A ConvLSTM network
(``rnndsl.make_recurrent("convlstm", ...)``: frames in as flat images, states of
[hidden, height, width]) reads the frames, and a 1x1 convolution of its output predicts
each next frame. Trained with Adam on fresh sequences at every step; reports the held-out
loss before and after, beside the loss of copying the last frame (what a model that has
not learned the motion would do), and writes a PNG of predicted against true frames
(with matplotlib, from the ``bench`` extra: ``pip install 'rnndsl[bench]'``).

    python examples/moving_blobs.py --threads 1    # 300 steps, about 100 s on one busy CPU core
    python examples/moving_blobs.py --steps 600 --hidden 16 8 --png blobs.png
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnndsl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, when imported from elsewhere
from data import HelpFormatter, number, output_file, positive_int, run  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--size", type=positive_int, default=32, help="canvas height and width, in pixels")
    parser.add_argument("--frames", type=positive_int, default=10, help="frames per sequence")
    parser.add_argument("--blobs", type=positive_int, default=2, help="blobs per sequence")
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=[8],
                        help="hidden channels of each ConvLSTM layer, one value per layer")
    parser.add_argument("--kernel", type=positive_int, default=5, help="the ConvLSTM's kernel size (odd)")
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=number(above=0), default=1e-2, help="Adam's learning rate")
    parser.add_argument("--backend", default="script", choices=("script", "eager"), help="how the cells run")
    parser.add_argument("--png", type=output_file, default=Path("moving_blobs.png"),
                        help="where the picture of predicted and true frames goes")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.kernel % 2 == 0:
        parser.error("--kernel must be odd: the convolution keeps height and width")
    if args.frames < 2:
        parser.error("--frames must be at least 2: one to read, one to predict")
    return args


def moving_blobs(count: int, frames: int, size: int, blobs: int, generator: torch.Generator) -> Tensor:
    """``count`` sequences of ``frames`` frames, (frames, count, size, size) in [0, 1]: Gaussian blobs
    of width about size/16 moving 0.5 to 1.5 pixels per frame (per size 32) and bouncing off the walls."""
    scale = size / 32
    position = torch.rand(count, blobs, 2, generator=generator) * (size - 1)
    angle = torch.rand(count, blobs, generator=generator) * 2 * torch.pi
    speed = (0.5 + torch.rand(count, blobs, generator=generator)) * scale
    velocity = torch.stack([angle.cos(), angle.sin()], -1) * speed.unsqueeze(-1)
    grid = torch.arange(size, dtype=torch.float32)
    sigma = 2.0 * scale
    sequence = []
    for _ in range(frames):
        rows = torch.exp(-(grid - position[..., 0:1]) ** 2 / (2 * sigma ** 2))  # (count, blobs, size)
        columns = torch.exp(-(grid - position[..., 1:2]) ** 2 / (2 * sigma ** 2))
        frame = (rows.unsqueeze(-1) * columns.unsqueeze(-2)).sum(1).clamp(max=1.0)
        sequence.append(torch.where(frame < 1e-4, 0.0, frame))  # no denormals far from the blobs: they are slow
        position = position + velocity
        # Bounce: past a wall, the position is reflected back inside and the velocity turned around.
        below, above = position < 0, position > size - 1
        position = torch.where(below, -position, torch.where(above, 2 * (size - 1) - position, position))
        velocity = torch.where(below | above, -velocity, velocity)
    return torch.stack(sequence)


class NextFrame(nn.Module):
    """Frames in, (frames, batch, size*size) flat; each next frame's prediction out, in [0, 1]."""

    def __init__(self, size: int, hidden: Sequence[int], kernel: int, backend: str):
        super().__init__()
        self.size = size
        self.recurrent = rnndsl.make_recurrent("convlstm", 1, list(hidden), backend=backend, save_hidden=False,
                                               height=size, width=size, kernel_size=kernel)
        self.readout = nn.Conv2d(hidden[-1], 1, 1)
        with torch.no_grad():  # frames are mostly background: start by predicting it
            self.readout.bias.fill_(-4.0)

    def forward(self, frames: Tensor) -> Tensor:
        steps, batch = frames.shape[:2]
        outputs, _ = self.recurrent(frames.reshape(steps, batch, -1))
        images = outputs.reshape(steps * batch, -1, self.size, self.size)
        return torch.sigmoid(self.readout(images)).reshape(steps, batch, self.size, self.size)


def loss_of(model: NextFrame, frames: Tensor) -> Tensor:
    """Mean squared error of the predictions of frames 2..T from the frames before them."""
    return F.mse_loss(model(frames[:-1]), frames[1:])


def copy_last_frame_loss(frames: Tensor) -> float:
    return F.mse_loss(frames[:-1], frames[1:]).item()


def save_picture(path: Path, frames: Tensor, predicted: Tensor) -> bool:
    """True frames 2..T above their predictions, for one sequence; False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    truth, guess = frames[1:], predicted
    figure, axes = plt.subplots(2, len(truth), figsize=(1.2 * len(truth), 2.6), squeeze=False)
    for column, (real, predicted_frame) in enumerate(zip(truth, guess)):
        for row, image in enumerate((real, predicted_frame)):
            axes[row, column].imshow(image.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[0, column].set_title(f"t={column + 2}", fontsize=8)
    axes[0, 0].set_ylabel("true", fontsize=8)
    axes[1, 0].set_ylabel("predicted", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main(argv: Optional[Sequence[str]] = None) -> Tuple[float, float]:
    """Train, report, draw; returns the held-out loss before and after training."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    held_out = moving_blobs(64, args.frames, args.size, args.blobs, data)
    model = NextFrame(args.size, args.hidden, args.kernel, args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    with torch.no_grad():
        before = loss_of(model, held_out).item()
    print(f"held-out loss {before:.5f} before training; copying the last frame: "
          f"{copy_last_frame_loss(held_out):.5f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        frames = moving_blobs(args.batch_size, args.frames, args.size, args.blobs, data)
        loss = loss_of(model, frames)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:4d}  train loss {loss.item():.5f}  {time.perf_counter() - start:6.1f}s")
    with torch.no_grad():
        after = loss_of(model, held_out).item()
        predicted = model(held_out[:-1, :1])[:, 0]
    print(f"held-out loss {after:.5f} after {args.steps} steps ({time.perf_counter() - start:.1f}s)")
    if save_picture(args.png, held_out[:, 0], predicted):
        print(f"wrote {args.png}: true frames above, predictions below")
    else:
        print(f"matplotlib is not installed: no picture (pip install 'rnndsl[bench]' for {args.png})")
    return before, after


if __name__ == "__main__":
    run(main)
