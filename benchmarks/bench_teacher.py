"""Teacher speed: images/s of the teacher's forward (targets and importance, as a training step calls it) for
OpenAI's CLIP ViT-B/16 (models_clip, the paper's teacher) and timm teachers of the same size, each relative to the
OpenAI one. Random weights: speed does not depend on their values, and nothing is downloaded.

    python benchmarks/bench_teacher.py                                     # the README's teachers, bf16, compiled
    python benchmarks/bench_teacher.py --device cpu --precision fp32 --compile off --batch_size 8 --steps 3
"""
import argparse
import time

import torch

import common
from models_clip import build_random_teacher
from models_teacher import build_timm_teacher
from util.precision import autocast

# (label, timm name (None: OpenAI's architecture), input size: a /14 teacher sees 196 px for the /16 grid at 224)
TEACHERS = [
    ('OpenAI CLIP ViT-B/16 (models_clip)', None, 224),
    ('timm:vit_base_patch16_clip_224.openai (QuickGELU)', 'vit_base_patch16_clip_224.openai', 224),
    ('timm:vit_base_patch16_clip_224.laion2b', 'vit_base_patch16_clip_224.laion2b', 224),
    ('timm:vit_base_patch16_224.dino', 'vit_base_patch16_224.dino', 224),
    ('timm:vit_base_patch14_dinov2.lvd142m @196', 'vit_base_patch14_dinov2.lvd142m', 196),
    ('timm:vit_base_patch14_reg4_dinov2.lvd142m @196', 'vit_base_patch14_reg4_dinov2.lvd142m', 196),
    ('timm:vit_base_patch16_dinov3.lvd1689m', 'vit_base_patch16_dinov3.lvd1689m', 224),
    ('timm:vit_base_patch16_siglip_224.webli', 'vit_base_patch16_siglip_224.webli', 224),
    ('timm:eva02_base_patch16_clip_224.merged2b', 'eva02_base_patch16_clip_224.merged2b', 224),
]


def build(name, size):
    if name is None:
        return build_random_teacher(16, size // 16, width=768, layers=12, output_dim=512)
    return common.quiet(build_timm_teacher, name, '', size, 1, False)


def images_per_sec(teacher, opts, device, size):
    """The forward under the training step's autocast, after --warmup untimed calls."""
    x = torch.randn(opts.batch_size, 3, size, size, device=device)
    for step in range(opts.warmup + opts.steps):
        if step == opts.warmup:
            common.synchronize(device)
            start = time.perf_counter()
        with autocast(opts.precision, device):
            teacher(x)
    common.synchronize(device)
    return opts.batch_size * opts.steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default='bf16', choices=['bf16', 'fp32'])
    parser.add_argument('--compile', default='on', choices=['on', 'off'])
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--only', nargs='*', default=None, help='labels containing one of these words')
    opts = parser.parse_args()
    device = torch.device(opts.device)
    common.print_header(device)
    table = common.Table('teacher', 'grid', 'target width', 'importance', 'images/s', 'relative to OpenAI')
    reference = None
    for label, name, size in TEACHERS:
        if opts.only and reference is not None and not any(word in label for word in opts.only):
            continue
        torch.manual_seed(0)
        teacher = build(name, size).to(device)
        if opts.compile == 'on':
            for block in teacher.blocks:
                block.compile(dynamic=False)
        speed = images_per_sec(teacher, opts, device, size)
        reference = reference or speed
        table.row(label, f'{teacher.grid_size}x{teacher.grid_size}', teacher.output_dim,
                  getattr(teacher, 'importance_source', 'class token'), f'{speed:,.1f}', f'{speed / reference:.2f}')
        del teacher
        common.release(device)


if __name__ == '__main__':
    main()
