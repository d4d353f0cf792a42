"""Guided upsampling with PacConv2DTranspose: a 4x-low-resolution depth-like map, an RGB image as guidance.

Synthetic data: each image is a few flat-coloured rectangles on a background; the target map is a
piecewise-constant function of the same regions (sharp edges where the image has edges). The network
sees the map at 1/4 resolution and must upsample it. A plain Conv2DTranspose can only blur the edges;
PacConv2DTranspose re-weights its taps by image similarity, so it can keep them.

Both layers' `kernel` weights are initialised to the same bilinear-upsampling kernel, but the two models
do not start as the same function. The plain layer starts as exact bilinear upsampling. The PAC layer
(normalize_kernel=True, guidance scale 8: a sharp guidance kernel) divides each output pixel by the sum
of K over the low-resolution samples its window covers (4 where the guidance is uniform), while the
bilinear weights of those samples sum to 1, so its output starts too small and its starting error is
higher (validation MSE about 0.18 against 0.04, seed 0). A few training steps learn the kernel's scale
and the guidance scale, and it ends below the plain layer (about 0.021 against 0.034). The script prints
both errors, at the start and after training.

    python examples/pac_guided_upsampling.py                 # 3 epochs of 32 steps, ~15 s on 2 CPU cores
    python examples/pac_guided_upsampling.py --steps 4 --epochs 1   # a smoke run
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from convrewrite.layers import PacConv2DTranspose  # noqa: E402

SIZE, FACTOR = 32, 4


def synthetic(n, rng):
    """images: (n, 32, 32, 3) in [0, 1]; maps: (n, 32, 32, 1), constant on each rectangle."""
    images = np.zeros((n, SIZE, SIZE, 3), "float32")
    maps = np.zeros((n, SIZE, SIZE, 1), "float32")
    for i in range(n):  # data generation only; the model never loops over pixels
        images[i] = rng.uniform(0, 1, 3)
        maps[i] = rng.uniform(-1, 1)
        for _ in range(3):
            r0, c0 = rng.integers(0, SIZE - 8, 2)
            r1, c1 = r0 + rng.integers(6, 20), c0 + rng.integers(6, 20)
            images[i, r0:r1, c0:c1] = rng.uniform(0, 1, 3)
            maps[i, r0:r1, c0:c1] = rng.uniform(-1, 1)
    low = maps.reshape(n, SIZE // FACTOR, FACTOR, SIZE // FACTOR, FACTOR, 1).mean(axis=(2, 4))
    return images, low, maps


def bilinear_kernel(k, factor):
    """(k, k, 1, 1) Conv2DTranspose kernel that performs bilinear upsampling by `factor`."""
    center = (k - 1) / 2 if k % 2 else factor - 0.5
    og = 1 - np.abs(np.arange(k) - center) / factor
    return (og[:, None] * og[None, :]).reshape(k, k, 1, 1).astype("float32")


def build(pac: bool):
    low = keras.Input((SIZE // FACTOR, SIZE // FACTOR, 1), name="low")
    image = keras.Input((SIZE, SIZE, 3), name="image")
    if pac:
        # Normalised: a guidance-weighted average of the low-res samples; the guidance scale is learned.
        up = PacConv2DTranspose(1, 2 * FACTOR, strides=FACTOR, padding="same", use_bias=False, normalize_kernel=True,
                                learn_guidance_scale=True, name="up")
        out = up([low, image])
    else:
        up = keras.layers.Conv2DTranspose(1, 2 * FACTOR, strides=FACTOR, padding="same", use_bias=False, name="up")
        out = up(low)
    model = keras.Model([low, image], out)
    weights = up.get_weights()
    weights[0] = bilinear_kernel(2 * FACTOR, FACTOR)
    if pac:
        weights[1] = np.full_like(weights[1], 8.0)  # start with a sharp guidance kernel (image in [0, 1])
    up.set_weights(weights)
    return model


def main(steps_per_epoch=32, epochs=3, seed=0, n_train=512, n_val=128, verbose=True):
    """Train both models; returns {name: (validation MSE at start, after training)}.

    steps_per_epoch * 16 should not exceed n_train (each epoch draws that many batches of 16)."""
    rng = np.random.default_rng(seed)
    train = synthetic(n_train, rng)
    val = synthetic(n_val, rng)
    results = {}
    for name, pac in (("Conv2DTranspose", False), ("PacConv2DTranspose", True)):
        keras.utils.set_random_seed(seed)
        model = build(pac)
        model.compile(optimizer=keras.optimizers.Adam(3e-2), loss="mse")
        before = model.evaluate([val[1], val[0]], val[2], verbose=0)
        model.fit([train[1], train[0]], train[2], batch_size=16, epochs=epochs, steps_per_epoch=steps_per_epoch,
                  verbose=0)
        results[name] = (before, model.evaluate([val[1], val[0]], val[2], verbose=0))
    if verbose:
        for name, (before, after) in results.items():
            print(f"{name:20s} validation MSE: {before:.4f} at start -> {after:.4f} after training")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32, help="training steps per epoch (batches of 16)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    main(steps_per_epoch=args.steps, epochs=args.epochs, seed=args.seed)
