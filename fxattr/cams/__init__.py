"""Class activation maps: CAM, Grad-CAM and its variants, Score-CAM, guided Grad-CAM."""

from fxattr.cams._cam import (
    cam,
    gradcam,
    gradcam_plus_plus,
    guided_gradcam,
    layercam,
    scorecam,
    xgradcam,
)

__all__ = ["cam", "gradcam", "gradcam_plus_plus", "guided_gradcam", "layercam", "scorecam", "xgradcam"]
