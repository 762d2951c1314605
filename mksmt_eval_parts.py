"""Evaluation extras for MKSMT (Yu et al. 2023; SPEC Sec. 3): parameter / FLOP
counts (Sec. 3.3, Table 7), robustness to flipped test images (Sec. 3.3), Grad-CAM
heat maps per head (Sec. 3.5).

Imports only torch / PIL / stdlib (to be moved into evaluate.py).
"""
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode


def gradcam(model, images, head_index):
    """Grad-CAM (Selvaraju et al. 2017, Eq. 1, 2) of one supervised head.

        alpha_c = 1/(H W) sum_{h,w} d y^c / d A_{c,h,w}            (Eq. 1)
        L       = ReLU(sum_c alpha_c A_c)                          (Eq. 2)

    y^c is the head's logit of its own predicted class, A the stage map the head
    reads. L is upsampled bilinearly to the image size and min-max normalised per
    image to [0, 1] (an all-zero map stays 0).

    Args:
        model: ``forward(images)`` returns a dict with ``"stages"`` (list of
            (B, C, H, W)), ``"head_logits"`` (list of (B, K)) and ``"head_stages"``
            (the stage index each head reads, same order). The head must compute
            its logits from that very ``out["stages"][s]`` tensor. Run in eval
            mode; the previous mode is restored.
        images: (B, 3, H_img, W_img).
        head_index: which head.
    Returns:
        cams (B, H_img, W_img) float in [0, 1], predictions (B,) int64.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(images)
            stage = out["stages"][out["head_stages"][head_index]]                 # (B, C, h, w)
            logits = out["head_logits"][head_index]                               # (B, K)
            predictions = logits.argmax(dim=1)                                     # (B,)
            score = logits.gather(1, predictions[:, None]).sum()  # samples are independent in eval mode
            (grad,) = torch.autograd.grad(score, stage, allow_unused=True)
    finally:
        model.train(was_training)
    if grad is None:
        raise ValueError(f"head {head_index} does not read out['stages'][{out['head_stages'][head_index]}]; "
                         f"Grad-CAM needs the stage map the head is computed from")
    weights = grad.mean(dim=(2, 3))                                               # (B, C)  Eq. (1)
    cam = F.relu((weights[:, :, None, None] * stage.detach()).sum(dim=1))         # (B, h, w)  Eq. (2)
    cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    cam = (cam - low) / span.clamp_min(1e-12)                                     # (B, H_img, W_img)
    return cam, predictions


def jet(values):
    """A jet-like colour map written out: blue (0) -> cyan -> green -> yellow -> red (1).
    values (...) in [0, 1] -> (..., 3) in [0, 1]."""
    v = values.clamp(0, 1)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25], dtype=v.dtype)  # where R, G, B peak
    return (1.5 - (4 * (v - centres)).abs()).clamp(0, 1)


def save_overlays(images_uint8, cams, path_prefix, alpha=0.5):
    """Write one PNG per image: (1 - alpha) * image + alpha * jet(cam).

    Args:
        images_uint8: (B, 3, H, W) uint8.
        cams: (B, H, W) in [0, 1] (``gradcam``'s output).
        path_prefix: files are ``{path_prefix}_{b:03d}.png``.
    Returns:
        list of the B paths.
    """
    folder = os.path.dirname(path_prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    images = images_uint8.detach().cpu().permute(0, 2, 3, 1).float() / 255      # (B, H, W, 3)
    colours = jet(cams.detach().cpu().float())                                   # (B, H, W, 3)
    blended = ((1 - alpha) * images + alpha * colours) * 255
    paths = []
    for b in range(len(blended)):
        path = f"{path_prefix}_{b:03d}.png"
        Image.fromarray(blended[b].round().clamp(0, 255).to(torch.uint8).numpy()).save(path)
        paths.append(path)
    return paths


def complexity(model, image_size):
    """Parameters and FLOPs of one forward pass on a (1, 3, S, S) input (eval mode,
    no grad), counted by ``torch.utils.flop_counter.FlopCounterMode`` (a
    multiply-add counts 2; element-wise ops, norms and softmax are not counted).
    Returns {"params": int, "flops": int}."""
    was_training = model.training
    model.eval()
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}


def flip_images(images, mode):
    """Robustness test of Sec. 3.3: ``"h"`` mirrors the width, ``"v"`` the height.
    images (B, C, H, W) -> same shape."""
    if mode == "h":
        return torch.flip(images, dims=[-1])
    if mode == "v":
        return torch.flip(images, dims=[-2])
    raise ValueError(f"flip mode must be 'h' or 'v', got {mode!r}")
