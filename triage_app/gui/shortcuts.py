"""Every command of the desktop app and its keys, declared once as data.

Menus, keyboard shortcuts and the ``?`` overlay are all built from :data:`COMMANDS`, so a key
cannot be bound without being listed, and the list cannot go stale. Plain data (no Qt): key
sequences are Qt's portable text form (``"Ctrl+O"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["COMMANDS", "Command", "by_menu", "command"]


@dataclass(frozen=True)
class Command:
    """One user command.

    ``scope`` is ``window`` (works anywhere in the main window) or ``viewer`` (only while the
    image has the focus, so that arrow keys still move through the worklist).
    """

    name: str
    label: str
    keys: tuple[str, ...]
    menu: str  # one of MENUS
    scope: str = "window"
    description: str = ""


COMMANDS: tuple[Command, ...] = (
    Command("open_files", "Open files…", ("Ctrl+O",), "File", description="Import DICOM files"),
    Command(
        "open_folder", "Open folder…", ("Ctrl+Shift+O",), "File", description="Import a folder"
    ),
    Command("quit", "Quit", ("Ctrl+Q",), "File"),
    Command("focus_search", "Search worklist", ("Ctrl+F",), "View"),
    Command("focus_worklist", "Go to worklist", ("F6",), "View"),
    Command("focus_viewer", "Go to image", ("F7",), "View"),
    Command("zoom_font_in", "Larger text", ("Ctrl+=",), "View"),
    Command("zoom_font_out", "Smaller text", ("Ctrl+-",), "View"),
    Command(
        "accept_result",
        "Accept result",
        ("Ctrl+Shift+A",),
        "Case",
        description="Record that you agree with the selected case's result",
    ),
    Command(
        "reject_result",
        "Reject result",
        ("Ctrl+Shift+R",),
        "Case",
        description="Record that you disagree with the selected case's result",
    ),
    Command(
        "acknowledge_result",
        "Acknowledge result",
        ("Ctrl+Shift+K",),
        "Case",
        description="Record that you have seen the result, without judging it",
    ),
    Command("show_history", "Case history", ("Ctrl+H",), "Case", description="States and feedback"),
    Command("preset_1", "Window preset 1", ("1",), "Image", "viewer"),
    Command("preset_2", "Window preset 2", ("2",), "Image", "viewer"),
    Command("preset_3", "Window preset 3", ("3",), "Image", "viewer"),
    Command("preset_4", "Window preset 4", ("4",), "Image", "viewer"),
    Command("preset_5", "Window preset 5", ("5",), "Image", "viewer"),
    Command("zoom_in", "Zoom in", ("+", "Shift+="), "Image", "viewer"),
    Command("zoom_out", "Zoom out", ("-",), "Image", "viewer"),
    Command("fit", "Fit to window", ("=",), "Image", "viewer"),
    Command("reset", "Reset view", ("Space",), "Image", "viewer"),
    Command("invert", "Invert", ("I",), "Image", "viewer"),
    Command("previous_frame", "Previous frame", ("Up",), "Image", "viewer"),
    Command("next_frame", "Next frame", ("Down",), "Image", "viewer"),
    Command("first_frame", "First frame", ("Home",), "Image", "viewer"),
    Command("last_frame", "Last frame", ("End",), "Image", "viewer"),
    Command("toggle_overlay", "Show AI result layer", ("O",), "Image", "viewer"),
    Command("toggle_heatmap", "Show saliency heatmap", ("H",), "Image", "viewer"),
    Command("heatmap_less", "Heatmap more transparent", ("[",), "Image", "viewer"),
    Command("heatmap_more", "Heatmap more opaque", ("]",), "Image", "viewer"),
    Command(
        "show_queue",
        "Upload queue…",
        ("Ctrl+Shift+U",),
        "Admin",
        description="Escalated cases waiting for the central server; retry refused ones",
    ),
    Command(
        "admin_settings",
        "Settings…",
        ("Ctrl+,",),
        "Admin",
        description="All settings; admins change them with the admin password",
    ),
    Command("show_shortcuts", "Keyboard shortcuts", ("?", "F1"), "Help"),
    Command("about", "About", (), "Help"),
)

#: Mouse gestures, listed in the ``?`` overlay next to the keys.
MOUSE: tuple[tuple[str, str], ...] = (
    ("Left drag", "Window (left/right) and level (up/down)"),
    ("Middle drag", "Pan"),
    ("Wheel", "Zoom"),
)

_BY_NAME: Mapping[str, Command] = MappingProxyType({c.name: c for c in COMMANDS})
MENUS = ("File", "View", "Case", "Image", "Admin", "Help")


def command(name: str) -> Command:
    return _BY_NAME[name]


def by_menu(menu: str) -> list[Command]:
    return [c for c in COMMANDS if c.menu == menu]
