"""util/clip_weights: OpenAI's URL table, the verified download (served over file://), and the weight files it
reads or refuses, each format checked through the teacher it loads into."""
import hashlib
import http.client
import io
import os
import re
import sys
import urllib.request

import pytest
import torch

from models_clip import build_random_teacher, load_clip_teacher
from conftest import CLIP_GRID as GRID, CLIP_PATCH as PATCH
from test_pretrained import fake_mmengine, mmengine_checkpoint
from util import clip_weights
from util.clip_weights import download_clip
from util.errors import UserError
from util.pretrained import read_checkpoint


def test_url_table_matches_openai_clip(clip):
    vits = {name: url for name, url in clip.clip._MODELS.items() if name.startswith('ViT')}
    assert clip_weights.CLIP_MODEL_URLS == vits
    assert set(clip_weights.CLIP_RESNETS) == set(clip.clip._MODELS) - set(vits)
    assert all(re.fullmatch('[0-9a-f]{64}', url.split('/')[-2]) for url in vits.values())  # the SHA-256


def test_fp16_checkpoint_loads_as_fp32(clip_sd, tmp_path):
    _, sd = clip_sd
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / 'half.pth')
    teacher = load_clip_teacher(str(tmp_path / 'half.pth'), str(tmp_path))
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    torch.testing.assert_close(teacher.proj, sd['visual.proj'].half().float())


@pytest.mark.parametrize('wrap', ['module', 'state_dict'])
def test_ddp_prefixed_and_wrapped_state_dicts_load(clip_sd, tmp_path, wrap):
    """A CLIP saved from a DDP-wrapped model (`module.visual.*`), bare or inside {'state_dict': ...}."""
    _, sd = clip_sd
    prefixed = {f'module.{k}': v for k, v in sd.items()}
    torch.save(prefixed if wrap == 'module' else {'epoch': 3, 'state_dict': prefixed}, tmp_path / 'ddp.pth')
    torch.save(sd, tmp_path / 'plain.pth')
    got = load_clip_teacher(str(tmp_path / 'ddp.pth'), str(tmp_path)).state_dict()
    want = load_clip_teacher(str(tmp_path / 'plain.pth'), str(tmp_path)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_mmpretrain_milan_file_serves_as_its_own_teacher(clip_sd, tmp_path):
    """MMPretrain's MILAN pretraining file keeps its CLIP (openai-clip's layout, text tower included) under
    `target_generator.tokenizer.` beside the student, in an MMEngine file with a message hub: given as the teacher
    file, it loads the very tower the plain CLIP file does, and nothing of the student."""
    _, sd = clip_sd
    student = {'backbone.patch_embed.projection.weight': torch.zeros(4, 3, 8, 8), 'neck.mask_token': torch.zeros(4)}
    with fake_mmengine() as mmengine:
        torch.save(mmengine_checkpoint({**student, **{f'target_generator.tokenizer.{k}': v for k, v in sd.items()}},
                                       mmengine.MessageHub()), tmp_path / 'milan_mmpretrain.pth')
    torch.save(sd, tmp_path / 'plain.pth')
    assert clip_weights.carries_clip_teacher(read_checkpoint(str(tmp_path / 'milan_mmpretrain.pth'))['state_dict'])
    assert not clip_weights.carries_clip_teacher(sd) and not clip_weights.carries_clip_teacher(student)
    got = load_clip_teacher(str(tmp_path / 'milan_mmpretrain.pth'), str(tmp_path)).state_dict()
    want = load_clip_teacher(str(tmp_path / 'plain.pth'), str(tmp_path)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A fake URL table serving a tiny CLIP state dict over file:// (right and wrong hash); counts fetches.
    Built from our own teacher, so the download tests run without openai-clip."""
    buf = io.BytesIO()
    torch.save({f'visual.{k}': v for k, v in build_random_teacher(PATCH, GRID).state_dict().items()}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    good, bad = tmp_path / 'srv' / sha, tmp_path / 'srv' / ('0' * 64)
    for d in (good, bad):
        d.mkdir(parents=True)
        (d / 'ViT-T-8.pt').write_bytes(data)
    urls = {'ViT-T/8': (good / 'ViT-T-8.pt').as_uri(), 'ViT-Bad/8': (bad / 'ViT-T-8.pt').as_uri()}
    monkeypatch.setattr(clip_weights, 'CLIP_MODEL_URLS', urls)
    calls = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, *a, **k: calls.append(url) or real(url, *a, **k))
    return calls


def test_download_once_and_reuse(served, tmp_path):
    cache = tmp_path / 'cache'
    teacher = load_clip_teacher('ViT-T/8', str(cache))
    assert os.listdir(cache) == ['ViT-T-8.pt'] and len(served) == 1
    assert teacher.grid_size == GRID
    load_clip_teacher('ViT-T/8', str(cache))
    assert len(served) == 1
    (cache / 'ViT-T-8.pt').write_bytes(b'corrupt')
    assert download_clip('ViT-T/8', str(cache)) == str(cache / 'ViT-T-8.pt')
    assert len(served) == 2 and (cache / 'ViT-T-8.pt').stat().st_size > 100


def test_downloaded_file_follows_the_umask(served, tmp_path):
    """A shared --clip_cache: the file must be readable by the other users the umask allows."""
    old = os.umask(0o022)
    try:
        download_clip('ViT-T/8', str(tmp_path / 'cache'))
    finally:
        os.umask(old)
    assert (tmp_path / 'cache' / 'ViT-T-8.pt').stat().st_mode & 0o777 == 0o644


def test_download_cut_off_mid_transfer(served, tmp_path, monkeypatch):
    """A chunked transfer that breaks off raises http.client.IncompleteRead: one line, nothing left behind."""
    class Broken(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b'partial')

    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, *a, **k: Broken())
    with pytest.raises(UserError, match='could not download CLIP ViT-T/8') as e:
        download_clip('ViT-T/8', str(tmp_path / 'cache'))
    assert '\n' not in str(e.value) and os.listdir(tmp_path / 'cache') == []


def test_download_hash_mismatch(served, tmp_path):
    cache = tmp_path / 'cache'
    with pytest.raises(UserError, match='SHA-256') as e:
        load_clip_teacher('ViT-Bad/8', str(cache))
    assert '\n' not in str(e.value)
    assert os.listdir(cache) == []


def test_resnet_name_refused(served, tmp_path):
    with pytest.raises(UserError, match='only ViT'):
        load_clip_teacher('RN50', str(tmp_path))
    assert served == []


def bad_files(tmp_path):
    (tmp_path / 'noise.pt').write_bytes(os.urandom(4096))
    (tmp_path / 'page.pt').write_bytes(b'<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n' * 20)
    torch.save({'state_dict': {'encoder.weight': torch.zeros(2)}}, tmp_path / 'other.pth')
    torch.save([torch.zeros(2)], tmp_path / 'list.pth')
    torch.save({'visual.layer1.0.conv1.weight': torch.zeros(1), 'visual.attnpool.positional_embedding': torch.zeros(1)},
               tmp_path / 'resnet.pth')
    return {'missing.pt': 'neither an existing file', 'noise.pt': 'cannot read', 'page.pt': 'not a PyTorch file',
            'other.pth': 'not a CLIP ViT', 'list.pth': 'not a state dict', 'resnet.pth': 'only ViT'}


@pytest.mark.parametrize('name, match', [('ViT-Z/99', 'neither an existing file'), ('RN50', 'only ViT')])
def test_bad_model_names(name, match, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'clip', None)  # GPU images have no openai-clip: any import of it fails
    with pytest.raises(UserError, match=match) as e:
        load_clip_teacher(name, str(tmp_path))
    assert '\n' not in str(e.value)


def test_bad_files(tmp_path):
    for name, match in bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(UserError, match=match) as e:
            load_clip_teacher(path, str(tmp_path / 'cache'))
        assert '\n' not in str(e.value) and path in str(e.value), str(e.value)
        assert 'weights_only' not in str(e.value)  # torch's advice to load unsafely is never passed on
