"""Random-number-generator states as plain values (tensors, ints, lists), so a checkpoint can carry every
process's generators and a resumed run draws exactly what the uninterrupted run would have."""
import random

import numpy as np
import torch
import torch.distributed as dist


def capture():
    """This process's torch (CPU and current CUDA device), numpy and Python generator states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_state[0], 'state': list(py_state[1]), 'gauss': py_state[2]},
    }


def restore(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))


def capture_all():
    """Every process's states, in rank order (a collective: all processes must call it)."""
    state = capture()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_own(states):
    """Restore this process's entry of capture_all(); a checkpoint from another process count is refused
    by the caller before this point, so the list always has an entry per rank."""
    restore(states[dist.get_rank() if dist.is_initialized() else 0])
