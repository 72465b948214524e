"""One epoch of MILAN pretraining."""
from models_milan import teacher_view
from util.data import EncodedImages, to_device_normalized
from util.device_decode import decode_on_device
from util.train_loop import train_epoch


def pretrain_loss(model, teacher, images, args, device):
    """The loss of one uint8 batch: normalised on the device, the teacher's targets and importance, the
    student's reconstruction under random or (--attn_mask) semantic-aware masking."""
    images = to_device_normalized(images, device)
    targets = importance = None
    if teacher is not None:
        targets, importance = teacher(teacher_view(images, args.teacher_input_norm))
    return model(images, targets, importance if args.attn_mask else None, args.mask_ratio)[0]


def train_one_epoch(model, teacher, loader, optimizer, scaler, epoch, args, device, logger, **loop):
    """The teacher turns each batch into targets and importance; the student reconstructs the targets
    from the masked view (semantic-aware masking when --attn_mask). `loop`: train_epoch's resume/stop options."""
    bad_images = loop.get('bad_images')

    def compute_loss(batch):
        images = batch[0]
        if isinstance(images, EncodedImages):  # --gpu_decode
            images, unreadable = decode_on_device(images, device, args.input_size)
            if bad_images is not None:
                bad_images.add(unreadable)
        return pretrain_loss(model, teacher, images, args, device)

    return train_epoch(model, loader, compute_loss, optimizer, scaler, epoch, args, device, logger, **loop)
