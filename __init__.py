"""ComfyUI entry point: ComfyUI imports this folder from custom_nodes/ as a package."""

# Imported as a plain file, as pytest does with the root of a clone named ComfyUI-GPEN (not a valid
# package name), there is no package to import the nodes from, and nothing to register.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
