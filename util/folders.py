"""Walking image folders whose links may lead back into themselves or to one folder twice, in torchvision
ImageFolder's order. Standard library only: tools/make_shards.py walks folders with it and must not import torch,
so that it runs wherever Python does (a storage node) and starts at once; util.data and util.shards use it too."""
import os

from util.errors import UserError

MAX_NOTES = 10  # lines about links per dataset; a tree of many bad links gets a count for the rest


def identity(stat_result):
    """A folder's or file's real identity: every path to it, through links or bind mounts, gives the same one."""
    return stat_result.st_dev, stat_result.st_ino


def folders_above(folder):
    """[(identity, path)] of `folder` and of each real folder it is in, up to the file system's root: a link to
    any of them leads back into `folder`, a loop."""
    chain, path = [(identity(os.stat(folder)), folder)], os.path.realpath(folder)
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        chain.append((identity(os.stat(path)), path))
    return chain


def link_text(path):
    """`path -> target` for a link (what it points to, as written), else the path."""
    try:
        return f'{path} -> {os.readlink(path)}'
    except OSError:  # no link: a bind mount
        return path


def loop_note(path, ancestor):
    return f'warning: not following the link loop {link_text(path)}: it leads back to {ancestor}, which holds it'


def again_note(path, first):
    return f'note: {link_text(path)} is the folder {first} again: its images are counted once, there'


def shown_notes(notes, root, limit):
    """The lines to show of `notes` about the folder `root`: the first `limit`, then one counting the rest, so a
    tree of many bad links does not bury the rest of the output."""
    return notes[:limit] + ([f'note: {len(notes) - limit} more links under {root} like those above']
                            if len(notes) > limit else [])


def _is_dir(entry):
    try:
        return entry.is_dir()  # links followed
    except OSError:  # as os.walk: what cannot be examined is a file
        return False


def walk_images(top, is_image, above, seen, notes):
    """The image paths under `top`, links to folders followed, in os.walk's and so torchvision ImageFolder's order
    (sorted folder paths, each folder's files sorted). A link back to a folder on the walk's path is a loop (`above`:
    [(identity, path)] of the folders `top` is in): not followed. A folder in `seen` ({identity: path}, filled here)
    was read by another path: not read again, so its images count once. Each of these adds a line to `notes`.
    Unreadable folders are skipped, as os.walk skips them."""
    found, stack = [], [(top, tuple(above))]
    while stack:
        folder, above = stack.pop()
        try:
            key = identity(os.stat(folder))
        except OSError:
            continue
        ancestor = next((path for k, path in above if k == key), None)
        if ancestor is not None or key in seen:
            notes.append(loop_note(folder, ancestor) if ancestor is not None else again_note(folder, seen[key]))
            continue
        seen[key] = folder
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            continue
        found.append((folder, [entry.path for entry in entries if not _is_dir(entry) and is_image(entry.path)]))
        below = above + ((key, folder),)
        stack += [(entry.path, below) for entry in reversed(entries) if _is_dir(entry)]  # the first name first
    return [path for _, paths in sorted(found, key=lambda item: item[0]) for path in paths]


def class_folders(directory, notes):
    """ImageFolder's classes of `directory` (its sorted folder names, links followed) less the folders that are a
    loop (`self -> .`), each of which adds a line to `notes`: one shared rule, so that shards written by
    tools/make_shards.py have the classes util.data finds in the folder."""
    above, classes = dict(folders_above(directory)), []
    for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
        if _is_dir(entry):
            key = identity(entry.stat())
            if key in above:
                notes.append(loop_note(entry.path, above[key]))
            else:
                classes.append(entry.name)
    return classes


def class_images(directory, classes, is_image, notes):
    """[image paths] of each class folder `directory/<class>` in `classes`' order, each walked by walk_images (lines
    about links added to `notes`). A folder in two classes is a UserError: its images would have two labels."""
    above, classes_of, per_class = folders_above(directory), {}, []
    for name in classes:
        seen = {}
        per_class.append(walk_images(os.path.join(directory, name), is_image, above, seen, notes))
        for key, path in seen.items():
            if key in classes_of:
                first, other = classes_of[key]
                raise UserError(f'{link_text(path)} (class {name}) and {first} (class {other}) are the same '
                                f'folder: its images cannot have two labels; remove one of them')
            classes_of[key] = link_text(path), name
    return per_class
