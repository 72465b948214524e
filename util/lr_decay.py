"""Layer-wise learning-rate decay for fine-tuning: deeper blocks move faster than the embedding."""


def layer_id(name, num_layers):
    """0 for the embeddings, i + 1 for blocks.i, num_layers + 1 for the final norm and head."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers + 1


def param_groups_layer_decay(model, weight_decay, layer_decay, no_weight_decay=('cls_token', 'pos_embed')):
    """One group per (layer, decay/no-decay), each with `lr_scale = layer_decay ** (num_layers + 1 - layer)`."""
    num_layers = len(model.blocks)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_weight_decay)
        layer = layer_id(name, num_layers)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                           'lr_scale': layer_decay ** (num_layers + 1 - layer)}
        groups[key]['params'].append(param)
    return list(groups.values())
