"""ComfyUI node classes (thin wrappers over the gpen library)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
