"""ComfyUI entry point: ComfyUI imports this folder from custom_nodes/ as a package."""

# The node help pages: ComfyUI serves this folder at /extensions/<this folder's name>/, and the
# frontend's node help panel reads docs/<node id>.md from it.
WEB_DIRECTORY = "./web"

# Imported as a plain file, as pytest does with the root of a clone named ComfyUI-GPEN (not a valid
# package name), there is no package to import the nodes from, and nothing to register.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
