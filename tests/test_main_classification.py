"""main_classification.py: the driver fine-tuning and linear probing share, run through both entry points."""
import argparse
import glob
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

import main_finetune
import main_linprobe
import main_pretrain
from conftest import pretrain_argv
from test_distributed import NPROC, launch
from test_pretrained import DIM, write_mae_checkpoint
from util.cli import parse_args
from util.errors import UserError


# The fast classifier setting every run here shares: tiny ViT, 32x32 inputs (a 4x4 grid of 8px patches).
FAST = ['--model', 'vit_tiny_patch8', '--input_size', '32', '--num_workers', '0', '--device', 'cpu',
        '--nb_classes', '4']


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='torch.distributed with the gloo backend is not available')


def cls_argv(data, out, *extra):
    """A fast classification command line (main_finetune or main_linprobe): 1 epoch of 32 images / 8."""
    return ['--data_path', str(data), '--output_dir', str(out), *FAST, '--batch_size', '8', '--epochs', '1',
            '--warmup_epochs', '0', '--print_freq', '2', *extra]


def run(entry, argv):
    args = parse_args(entry.get_args_parser(), entry.DEMO_DEFAULTS, argv)
    return args, entry.main(args)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def raises_one_line(message, entry, argv):
    """The entry point stops with a UserError whose single line matches `message`."""
    with pytest.raises(UserError, match=message) as info:
        run(entry, argv)
    assert '\n' not in str(info.value).strip()
    return str(info.value)


@pytest.fixture(scope='module')
def pretrained(tiny_data, tmp_path_factory):
    """A pretraining checkpoint written by main_pretrain (pixel target, 1 epoch on the tiny data)."""
    out = tmp_path_factory.mktemp('pretrain')
    run(main_pretrain, pretrain_argv(tiny_data, out))
    return str(out / 'checkpoint-last.pth')


@pytest.fixture(scope='module')
def finetuned(tiny_data, pretrained, tmp_path_factory):
    """main_finetune for 1 epoch (4 iterations) from the pretraining checkpoint: its output folder."""
    out = tmp_path_factory.mktemp('finetune')
    run(main_finetune, cls_argv(tiny_data, out, '--finetune', pretrained))
    assert (out / 'checkpoint-best.pth').exists(), 'the first epoch must beat 0% to write a best checkpoint'
    return out


def test_entry_points_build_their_models_from_a_mae_file(tmp_path):
    path = str(tmp_path / 'mae_pretrain.pth')
    state = write_mae_checkpoint(path, 'module.')
    ft = main_finetune.build_model(argparse.Namespace(model='vit_tiny_patch8', input_size=32, nb_classes=4,
                                                      global_pool=True, drop_path=0.1, finetune=path))
    lp = main_linprobe.build_model(argparse.Namespace(model='vit_tiny_patch8', input_size=32, nb_classes=4,
                                                      global_pool=False, finetune=path))
    for model in (ft, lp):
        for key, value in model.state_dict().items():
            if not key.startswith(('head', 'fc_norm')):
                assert torch.equal(value, state[key]), key
    # the new head: tiny weights, zero bias
    assert ft.head.weight.abs().max() < 1e-3 and not ft.head.bias.any()
    assert torch.equal(ft.fc_norm.weight, torch.ones(DIM)) and not ft.fc_norm.bias.any()


@pytest.fixture(scope='module')
def odd_data(tiny_data, tmp_path_factory):
    """The tiny data with 15 validation images (one removed): in batches of 4, rank 0 of 2 sees 8 and rank 1
    sees 7. A sampler that pads (DistributedSampler) would count 16."""
    data = tmp_path_factory.mktemp('odd') / 'data'
    shutil.copytree(tiny_data, data)
    os.remove(sorted(glob.glob(str(data / 'val' / 'disc' / '*')))[0])
    return data


def eval_argv(data, out, checkpoint, *extra):
    return ['--data_path', str(data), '--output_dir', str(out), *FAST, '--batch_size', '4', '--eval',
            '--resume', str(checkpoint), *extra]


def launch_probe(tmp, entry, argv):
    """`entry` (finetune or linprobe) under torchrun with 2 processes: what main() returned on each rank."""
    launch(tmp, ['torch.distributed.run'], os.path.join('tests', 'eval_probe.py'), [str(tmp / 'probe'), entry, *argv])
    records = [json.loads((tmp / 'probe' / f'rank{r}.json').read_text()) for r in range(NPROC)]
    for r, rec in enumerate(records):
        assert (rec['rank'], rec['world_size'], rec['distributed']) == (r, NPROC, True)
    assert records[0]['stats'] == records[1]['stats']  # all-reduced: both ranks hold the same numbers
    return records[0]['stats']


def assert_same_evaluation(stats, reference):
    assert (stats['acc1'], stats['acc5']) == (reference['acc1'], reference['acc5'])
    # the float32 loss sums are grouped differently over the two shards' batches: equal up to rounding
    assert stats['loss'] == pytest.approx(reference['loss'], rel=1e-6, abs=0)


@needs_gloo
def test_two_process_eval_equals_one_process(odd_data, finetuned, tmp_path):
    """main_finetune --eval of the fine-tuned checkpoint under torchrun and in one process."""
    argv = eval_argv(odd_data, tmp_path / 'eval', finetuned / 'checkpoint-best.pth')
    _, single = run(main_finetune, argv)
    hits = single['acc1'] * 15 / 100
    assert hits == pytest.approx(round(hits), abs=1e-9)  # counted over exactly 15 images
    assert_same_evaluation(launch_probe(tmp_path, 'finetune', argv), single)


@needs_gloo
def test_two_process_linprobe_evaluates_the_model_it_saves(odd_data, pretrained, tmp_path):
    """A 2-process linear probe (1 epoch, 2 x 4 iterations of 4 images): the evaluation after the epoch must
    be the one a single process gets from the checkpoint it saved."""
    out = tmp_path / 'linprobe'
    trained = launch_probe(tmp_path, 'linprobe', cls_argv(odd_data, out, '--finetune', pretrained,
                                                          '--batch_size', '4', '--blr', '50'))
    assert load(out / 'checkpoint-last.pth')['epoch'] == 0
    _, single = run(main_linprobe, eval_argv(odd_data, tmp_path / 'eval', out / 'checkpoint-last.pth'))
    assert_same_evaluation(trained, single)


def test_missing_val_folder(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(tiny_data, 'train'), data / 'train')
    raises_one_line(f'no folder {data / "val"}: --data_path must hold val/<class>/<images>', main_finetune,
                    cls_argv(data, tmp_path / 'out'))


@pytest.mark.parametrize('entry', [main_finetune, main_linprobe], ids=['finetune', 'linprobe'])
def test_class_count_mismatch(tiny_data, tmp_path, entry):
    raises_one_line(r'train/ holds 4 classes but --nb_classes is 10; pass --nb_classes 4$', entry,
                    cls_argv(tiny_data, tmp_path / 'out', '--nb_classes', '10'))


def test_val_class_count_mismatch(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / 'val' / 'square')
    raises_one_line(r'val/ holds 3 classes but --nb_classes is 4', main_finetune, cls_argv(data, tmp_path / 'out'))


def test_missing_finetune_file(tiny_data, tmp_path):
    raises_one_line('--finetune /nonexistent.pth: no such file', main_finetune,
                    cls_argv(tiny_data, tmp_path / 'out', '--finetune', '/nonexistent.pth'))


@pytest.mark.parametrize('entry', [main_finetune, main_linprobe], ids=['finetune', 'linprobe'])
def test_eval_needs_resume(tiny_data, tmp_path, entry):
    raises_one_line('--eval needs --resume CHECKPOINT', entry, cls_argv(tiny_data, tmp_path / 'out', '--eval'))


@pytest.mark.parametrize('mode', [[], ['--eval']], ids=['train', 'eval'])
def test_resume_from_a_checkpoint_of_another_kind(tiny_data, tmp_path, pretrained, mode):
    raises_one_line(r"is not a finetune checkpoint of this repository \(found 'pretrain'\)", main_finetune,
                    cls_argv(tiny_data, tmp_path / 'out', '--resume', pretrained, *mode))
    mae = str(tmp_path / 'mae_pretrain.pth')
    write_mae_checkpoint(mae)
    raises_one_line('mae_pretrain.pth is a released MAE/MILAN checkpoint, not a training state to resume: pass '
                    'it to --finetune', main_finetune,
                    cls_argv(tiny_data, tmp_path / 'out', '--resume', mae, *mode))


def test_eval_of_the_best_checkpoint(tiny_data, finetuned, tmp_path, capsys):
    best_path = str(finetuned / 'checkpoint-best.pth')
    best = load(best_path)
    assert best['kind'] == 'finetune' and best['epoch'] == 0
    logged = [json.loads(line) for line in open(finetuned / 'log.txt')]
    capsys.readouterr()
    _, stats = run(main_finetune, cls_argv(tiny_data, tmp_path / 'eval', '--eval', '--resume', best_path))
    # the same weights on the same images as the evaluation after training: the same numbers
    assert stats['acc1'] == best['best_acc1'] == logged[0]['val_acc1']
    assert (stats['acc5'], stats['loss']) == (logged[0]['val_acc5'], logged[0]['val_loss'])
    out = capsys.readouterr().out
    assert f'{best_path} on 16 images: top-1 {stats["acc1"]:.2f}% top-5 {stats["acc5"]:.2f}%' in out
    assert not glob.glob(str(tmp_path / 'eval' / 'checkpoint-*.pth'))  # --eval trains and saves nothing


def test_resume_runs_only_the_remaining_epoch_and_carries_best(tiny_data, finetuned, tmp_path, capsys):
    out = tmp_path / 'ft'
    shutil.copytree(finetuned, out)
    first_log = (out / 'log.txt').read_text()
    best_bytes = (out / 'checkpoint-best.pth').read_bytes()
    # an unbeatable best in the checkpoint: a resumed run that forgot it would write a new best
    last = load(out / 'checkpoint-last.pth')
    assert last['epoch'] == 0
    last['best_acc1'] = 100.0
    torch.save(last, out / 'checkpoint-last.pth')

    capsys.readouterr()
    _, stats = run(main_finetune, cls_argv(tiny_data, out, '--epochs', '2'))
    log = capsys.readouterr().out
    assert 'resumed from' in log and 'epoch 0 [' not in log and 'epoch 1 [' in log
    lines = (out / 'log.txt').read_text()
    assert lines.startswith(first_log)
    assert [json.loads(line)['epoch'] for line in lines.splitlines()] == [0, 1]
    resumed = load(out / 'checkpoint-last.pth')
    assert resumed['epoch'] == 1 and resumed['best_acc1'] == 100.0
    assert (out / 'checkpoint-best.pth').read_bytes() == best_bytes
    # the optimizer went on from the saved state: 4 + 4 AdamW steps
    assert {float(s['step']) for s in resumed['optimizer']['state'].values()} == {8.0}
    assert stats['acc1'] == json.loads(lines.splitlines()[-1])['val_acc1']


@pytest.mark.parametrize('entry', [main_finetune, main_linprobe])
def test_shards_train_and_evaluate_as_the_folder_does(tiny_data, tiny_shards, tmp_path, entry):
    """Fine-tuning and probing read train and val shards (labels from .cls, classes from classes.json): the same
    bytes, labels and augmentations as the folder they were made from, so the same run, to the same numbers."""
    _, folder = run(entry, cls_argv(tiny_data, tmp_path / 'folder'))
    _, shards = run(entry, cls_argv(tiny_shards, tmp_path / 'shards'))
    assert (shards['acc1'], shards['acc5']) == (folder['acc1'], folder['acc5'])
    assert shards['loss'] == pytest.approx(folder['loss'], rel=1e-6)
    trained = load(tmp_path / 'shards' / 'checkpoint-last.pth')['model']
    reference = load(tmp_path / 'folder' / 'checkpoint-last.pth')['model']
    assert trained.keys() == reference.keys() and all(torch.equal(trained[k], reference[k]) for k in reference)
