"""The clinician desktop app (PySide6): widgets only, over the Qt-free core."""
