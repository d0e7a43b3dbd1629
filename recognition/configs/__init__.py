"""Configuration presets. ``base.py`` defines every key with its default; each other module here is one preset
(named by its file) that overrides some of them. ``recognition.config.get_config(name)`` merges the two."""
