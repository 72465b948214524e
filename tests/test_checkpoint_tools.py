"""tools/checkpoint_tools.py: summary, export to timm (same outputs there), import of MAE/MILAN releases."""
import argparse
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import main_finetune
import models_milan
import models_vit
from conftest import ROOT
from test_pretrained import perturbed_milan, write_mmpretrain_milan
from tools import checkpoint_tools
from util.checkpoint import load_checkpoint
from util.cli import parse_args
from util.errors import UserError
from util.pretrained import read_checkpoint

TINY = dict(img_size=32, patch_size=8, embed_dim=192, depth=4, num_heads=3)


@pytest.fixture(scope='module')
def pretrained(milan_checkpoint):
    return milan_checkpoint


@pytest.fixture(scope='module')
def finetuned(tiny_data, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp('finetune')
    argv = ['--data_path', tiny_data, '--output_dir', str(out), '--model', 'vit_tiny_patch8', '--input_size', '32',
            '--nb_classes', '4', '--epochs', '1', '--warmup_epochs', '0', '--batch_size', '8', '--num_workers', '0',
            '--device', 'cpu', '--finetune', pretrained]
    main_finetune.main(parse_args(main_finetune.get_args_parser(), main_finetune.DEMO_DEFAULTS, argv))
    return str(out / 'checkpoint-last.pth')


def tool(*argv):
    parsed = checkpoint_tools.get_args_parser().parse_args([str(a) for a in argv])
    parsed.func(parsed)


def printed_loader(output):
    """Run the indented lines export-timm prints; they must build `model` with the weights loaded."""
    code = textwrap.dedent('\n'.join(line for line in output.splitlines() if line.startswith('    ')))
    scope = {'timm': timm}
    exec(code, scope)
    return scope['model'].eval()


def test_export_finetuned_global_pool_gives_the_same_logits(finetuned, tmp_path, capsys):
    out = tmp_path / 'timm.pth'
    tool('export-timm', finetuned, out)
    timm_model = VisionTransformer(**TINY, num_classes=4, global_pool='avg').eval()
    timm.models.load_checkpoint(timm_model, str(out), strict=True)
    ours = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=True).eval()
    ours.load_state_dict(load_checkpoint(finetuned, 'finetune')['model'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(timm_model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(printed_loader(capsys.readouterr().out)(x), expected, rtol=0, atol=0)


def test_export_pretrained_encoder_gives_the_same_features(pretrained, tmp_path, capsys):
    out = tmp_path / 'timm.pth'
    tool('export-timm', pretrained, out, '--model', 'vit_tiny_patch8')
    printed = capsys.readouterr().out
    assert 'num_classes=0' in printed and 'encoder without head' in printed
    timm_model = VisionTransformer(**TINY, num_classes=0).eval()
    timm.models.load_checkpoint(timm_model, str(out), strict=True)
    ckpt = load_checkpoint(pretrained, 'pretrain')
    milan = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=64,
                                      prompting_decoder=True).eval()
    milan.load_state_dict(ckpt['model'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = milan.forward_encoder(x, torch.arange(16).expand(2, -1), 16)  # every patch visible
        torch.testing.assert_close(timm_model.forward_features(x), expected)
        torch.testing.assert_close(printed_loader(printed).forward_features(x), expected)


def test_export_of_a_named_size_loads_through_timm_create_model(tmp_path, capsys):
    """ViT-S/16 at 32 px (2x2 grid): the printed timm.create_model(..., checkpoint_path=...) call loads it."""
    with torch.device('meta'):  # random weights below, without the slow initialisation
        model = models_vit.create_model('vit_small_patch16', 32, num_classes=3, global_pool=True).eval()
    model.to_empty(device='cpu')
    for tensor in model.state_dict().values():
        tensor.normal_(0, 0.02)
    path, out = tmp_path / 'ckpt.pth', tmp_path / 'timm.pth'
    torch.save({'kind': 'finetune', 'model': model.state_dict(), 'epoch': 4, 'args': {}}, path)
    tool('export-timm', path, out)
    printed = capsys.readouterr().out
    assert (f"model = timm.create_model('vit_small_patch16_224', pretrained=False, checkpoint_path={str(out)!r}, "
            f"num_classes=3, global_pool='avg', img_size=32)") in printed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(printed_loader(printed)(x), model(x))


def test_export_refuses_a_linear_probe_and_a_wrong_model(finetuned, tmp_path):
    state = load_checkpoint(finetuned, 'finetune')['model']
    state = {('head.1.' + k[5:] if k.startswith('head.') else k): v for k, v in state.items()}
    probe = tmp_path / 'probe.pth'
    torch.save({'kind': 'linprobe', 'model': state, 'args': {'finetune': 'pre.pth'}}, probe)
    with pytest.raises(UserError, match='linear probe.*export the encoder from pre.pth'):
        tool('export-timm', probe, tmp_path / 'out.pth')
    with pytest.raises(UserError, match='holds a vit_tiny_patch8 encoder, not --model vit_base_patch16'):
        tool('export-timm', finetuned, tmp_path / 'out.pth', '--model', 'vit_base_patch16')
    assert not (tmp_path / 'out.pth').exists()
    for command in ('export-timm', 'import-mae'):
        with pytest.raises(UserError, match=f'cannot write {tmp_path}/nodir/out.pth: there is no folder'):
            tool(command, finetuned, tmp_path / 'nodir' / 'out.pth')


def test_summary_of_pretraining_and_finetuning(pretrained, finetuned, capsys):
    tool('summary', pretrained)
    out = capsys.readouterr().out
    milan = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=64,
                                      prompting_decoder=True)
    total = sum(p.numel() for p in milan.parameters())
    encoder = sum(p.numel() for n, p in milan.named_parameters() if not n.startswith(('decoder_', 'mask_token')))
    assert 'kind: pretrain\n' in out and 'model: mae_vit_tiny_patch8\n' in out and 'epoch: 0\n' in out
    assert 'input size: 32\n' in out and f'parameters: encoder {encoder:,} / total {total:,}\n' in out
    assert 'use_clip=True change_decoder=True attn_mask=True mask_ratio=0.75' in out

    tool('summary', finetuned)
    out = capsys.readouterr().out
    vit = models_vit.create_model('vit_tiny_patch8', 32, 4)
    total = sum(p.numel() for p in vit.parameters())
    encoder = total - sum(p.numel() for n, p in vit.named_parameters() if n.startswith('head'))
    assert 'kind: finetune\n' in out and 'model: vit_tiny_patch8\n' in out and 'epoch: 0\n' in out
    assert f'parameters: encoder {encoder:,} / total {total:,}\n' in out
    assert 'global_pool=True nb_classes=4' in out and 'best_acc1: ' in out


def released(tmp_path, prompting, use_clip, args=True):
    """A MAE/MILAN-layout pretraining file: DDP `module.` prefixes and a pickled argparse.Namespace."""
    model = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip' if use_clip else 'pixel',
                                      target_dim=64, prompting_decoder=prompting, norm_pix_loss=not use_clip)
    ckpt = {'model': {f'module.{k}': v for k, v in model.state_dict().items()}, 'optimizer': {}, 'epoch': 399,
            'scaler': {}}
    if args:
        ckpt['args'] = argparse.Namespace(
            model='mae_vit_tiny_patch8', input_size=32, mask_ratio=0.75, norm_pix_loss=not use_clip, batch_size=256,
            accum_iter=2, epochs=400, blr=1.5e-4, lr=None, use_clip=use_clip, change_decoder=prompting,
            attn_mask=use_clip, dist_on_itp=False, gpu=0, cluster_loss=False)
    path = tmp_path / 'released.pth'
    torch.save(ckpt, path)
    return path, model


@pytest.mark.parametrize('prompting,use_clip', [(False, False), (True, True)], ids=['mae', 'milan'])
def test_import_mae_round_trips(tmp_path, capsys, prompting, use_clip):
    path, source = released(tmp_path, prompting, use_clip)
    out = tmp_path / 'ours.pth'
    tool('import-mae', path, out)
    ckpt = load_checkpoint(str(out), 'pretrain')
    args = ckpt['args']
    assert ckpt['epoch'] == 399 and 'optimizer' not in ckpt
    assert (args['model'], args['input_size'], args['use_clip'], args['change_decoder']) == \
           ('mae_vit_tiny_patch8', 32, use_clip, prompting)
    assert args['norm_pix_loss'] == (not use_clip) and args['accum_iter'] == 2 and 'gpu' not in args
    model = models_milan.create_model(args['model'], img_size=args['input_size'],
                                      target='clip' if args['use_clip'] else 'pixel', target_dim=64,
                                      prompting_decoder=args['change_decoder'], norm_pix_loss=args['norm_pix_loss'])
    model.load_state_dict(ckpt['model'])  # strict
    for key, value in source.state_dict().items():
        assert torch.equal(ckpt['model'][key], value)

    capsys.readouterr()
    tool('summary', path)
    out = capsys.readouterr().out
    assert 'kind: released MAE/MILAN pretraining file' in out and 'model: mae_vit_tiny_patch8\n' in out


def test_import_of_mmpretrain_milan_gives_the_same_model(tmp_path, capsys):
    """MMPretrain's MILAN pretraining file (an MMEngine file: message hub, optimizer, CLIP teacher, no args): every
    tensor of encoder and prompting decoder lands in our layout, the model computes exactly what the source does,
    and what the file doesn't say is MILAN's recipe (CLIP target, prompting decoder, semantic-aware masking)."""
    source = perturbed_milan(prompting=True)
    path, out = tmp_path / 'milan_vit-base-p16_mmpretrain.pth', tmp_path / 'ours.pth'
    write_mmpretrain_milan(path, source)
    tool('summary', path)
    printed = capsys.readouterr().out
    assert 'kind: released MMPretrain pretraining file\n' in printed and 'epoch: 399\n' in printed
    assert 'model: mae_vit_tiny_patch8 (read off the weights)\n' in printed
    tool('import-mae', path, out)
    assert 'prompting decoder, epoch 399;' in capsys.readouterr().out
    ckpt = load_checkpoint(str(out), 'pretrain')
    args = ckpt['args']
    assert ckpt['epoch'] == 399
    assert (args['use_clip'], args['change_decoder'], args['attn_mask'], args['input_size']) == (True, True, True, 32)
    assert 'clip_model' not in args and not args['norm_pix_loss']  # OUT.pth never points back at the file
    model = models_milan.create_from_flags(args, 64).eval()
    model.load_state_dict(ckpt['model'])  # strict
    for key, value in source.state_dict().items():
        assert torch.equal(ckpt['model'][key], value), key
    x, targets = torch.randn(2, 3, 32, 32), torch.randn(2, 17, 64)
    ids = torch.stack([torch.randperm(16) for _ in range(2)])
    with torch.no_grad():
        for got, expected in zip(model(x, targets, ids_shuffle=ids), source(x, targets, ids_shuffle=ids)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_import_mae_refuses_what_does_not_match(tmp_path):
    path, source = released(tmp_path, prompting=False, use_clip=False, args=False)
    state = {k.replace('decoder_blocks.0.attn.qkv', 'decoder_blocks.0.attn.in_proj'): v
             for k, v in source.state_dict().items()}
    torch.save({'model': state}, path)
    with pytest.raises(UserError, match=r'missing: decoder_blocks\.0\.attn\.qkv\.bias, decoder_blocks\.0\.attn\.qkv'
                                        r'\.weight; unexpected: decoder_blocks\.0\.attn\.in_proj\.bias'):
        tool('import-mae', path, tmp_path / 'out.pth')
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}
    torch.save({'model': encoder}, path)
    with pytest.raises(UserError, match='encoder without decoder'):
        tool('import-mae', path, tmp_path / 'out.pth')
    assert not (tmp_path / 'out.pth').exists()


def test_command_line(pretrained, tmp_path, monkeypatch, capsys):
    """`python -m tools.checkpoint_tools` (run in-process the way -m runs it) and `python tools/...py` (a real
    process from another folder); errors are one line with exit code 2."""
    monkeypatch.setattr(sys, 'argv', ['checkpoint_tools', 'summary', pretrained])
    monkeypatch.delitem(sys.modules, 'tools.checkpoint_tools')  # as in a fresh `python -m`
    runpy.run_module('tools.checkpoint_tools', run_name='__main__')
    assert 'model: mae_vit_tiny_patch8' in capsys.readouterr().out
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'checkpoint_tools.py'), 'import-mae',
                             pretrained, str(tmp_path / 'out.pth')], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [f'error: {pretrained} is already a pretrain checkpoint of this '
                                                f'repository'], result.stderr


def test_import_of_mmpretrain_mae_trains_on_normalised_pixels(tmp_path, capsys):
    """MMPretrain's MAE file keeps no args; its configs train on normalised pixels (MAEPretrainHead(norm_pix=True)),
    so the import says so, and names no teacher (the file carries none)."""
    path, out = tmp_path / 'mae_vit-base-p16_mmpretrain.pth', tmp_path / 'ours.pth'
    write_mmpretrain_milan(path, perturbed_milan(prompting=False))
    tool('import-mae', path, out)
    args = load_checkpoint(str(out), 'pretrain')['args']
    assert (args['use_clip'], args['change_decoder'], args['attn_mask'], args['norm_pix_loss']) == (False, False,
                                                                                                   False, True)
    assert 'clip_model' not in args


def test_a_carried_teacher_means_the_clip_target_even_at_the_pixel_heads_width(tmp_path):
    """A CLIP head as wide as a pixel head (8 x 8 x 3 = 192 here; a 768-d teacher at /16) can't be told from one by
    its shape; a file that carries its CLIP teacher says which it is."""
    source = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=192,
                                       prompting_decoder=True)
    path = tmp_path / 'milan_mmpretrain.pth'
    write_mmpretrain_milan(path, source)
    model, mapped = checkpoint_tools.released_pretraining(read_checkpoint(str(path)), str(path))
    assert model.target == 'clip' and mapped['use_clip'] and mapped['attn_mask'] and not mapped['norm_pix_loss']
