"""The page (Gradio Blocks): picture -> instance masks (proposed, clicked, painted, uploaded, SAM)
-> TIMI run with progress -> the scene in a 3D viewer, per-instance downloads, report pictures.

Every handler catches what it raises and shows it as the command line's one line
(:func:`timi.webapp.run.page_error`) in the status box: the page never shows a traceback. The
per-session state is a dict: ``picture`` (path), ``folder``, ``labels`` (H, W) int32, ``names``,
``selected`` (labels), ``points`` / ``box`` (SAM prompts), ``mask_error`` (the line of the last mask
step that failed: Run refuses until a mask step succeeds).

The picture's upload event skips Gradio's decoding (``preprocess=False``): the file is opened by
:func:`timi.webapp.run.save_picture`, which checks its size from the header first. The run is an
async handler around :func:`timi.webapp.run.run` in a thread: a cancel (the Stop button, the API's
``cancel``) or a client that went away sets the run's stop flag, and the handler returns only when
the run has stopped, so Gradio's run slot is free only then.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from . import masks as M
from .limits import RUN_ID, client_gone
from .run import (AppConfig, for_page, masks_from_files, new_folder, page_defaults, page_error, preview,
                  run, save_picture)

__all__ = ["build_app", "theme", "finish", "MASK_FILE_TYPES"]

#: The status box's line while a stop is under way (the run ends at its next step).
STOPPED_STATUS = "stopped: the run ends at its next denoising step; nothing is written."

#: What the upload tab takes (the formats of ``timi generate --masks``).
MASK_FILE_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".npy", ".json"]

INTRO = """# TIMI - image to 3D, one object per instance mask
Upload a picture (a cut-out RGBA picture works best). Masks are **proposed** from it; click instances
in the mask view to select them, then merge, split or remove. Or paint them, upload mask files, or click
with SAM (when the app was started with `--sam-checkpoint`). Then **Run**."""


def theme():
    """Gradio's default theme with the system's fonts (the default fetches web fonts; the app makes no
    request outside the machine)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def _picture_array(st) -> np.ndarray:
    return np.asarray(Image.open(st["picture"]).convert("RGBA"))


def _views(st, cfg: AppConfig, timi: bool = True):
    """(mask overlay, token-grid picture or None, notes text, error line or None) for the state's labels."""
    if not st or "picture" not in st:
        return None, None, "", None
    labels = st["labels"]
    overlay = M.labels_overlay(_picture_array(st), labels, st.get("selected", []))
    if labels.max() == 0:
        return overlay, None, "no instance masks yet.", None
    try:
        pv = preview(Path(st["picture"]), labels, st["names"], cfg, Path(st["folder"]), timi)
    except Exception as e:  # noqa: BLE001 - shown as one line
        line = page_error(e)
        return overlay, None, line, line
    lines = [f"{pv.count} instance(s): " + ", ".join(f"{k + 1}: {n}" for k, n in enumerate(pv.names))]
    lines += [for_page(f"warning: {n}") for n in pv.notes]
    return overlay, str(pv.figure), "\n".join(lines), None


async def finish(work: asyncio.Future, stop: threading.Event, gone=lambda: False):
    """The result of ``work`` (a run in a thread). A cancel of this task, or ``gone()`` turning true
    (polled twice a second), sets ``stop``; this then waits until the run has stopped before it
    re-raises the cancel, so whoever awaits it (Gradio's queue, which frees the run slot after)
    knows the run is over, not just abandoned."""
    cancelled = False
    while not work.done():
        try:
            await asyncio.wait({work}, timeout=0.5)
        except asyncio.CancelledError:
            cancelled = True
            stop.set()
            continue
        if not work.done() and gone():
            stop.set()
    if cancelled:
        raise asyncio.CancelledError
    return work.result()


def build_app(cfg: AppConfig):
    """The ``gr.Blocks`` of ``timi app`` for the command line's :class:`AppConfig`."""
    d = page_defaults(cfg)
    with gr.Blocks(title="TIMI", delete_cache=(3600, 24 * 3600)) as demo:  # Gradio's copies: a day
        st = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                picture = gr.Image(label="picture (RGBA or RGB)", type="filepath", image_mode=None, format="png",
                                   sources=["upload", "clipboard"], elem_id="picture", height=320)
                with gr.Tabs():
                    with gr.Tab("proposed", id="proposed"):
                        with gr.Row():
                            threshold = gr.Slider(2, 30, value=8, step=1, label="colour difference that splits touching parts")
                            propose = gr.Button("propose again", elem_id="propose")
                        with gr.Row():
                            merge = gr.Button("merge selected", elem_id="merge")
                            split = gr.Button("split selected", elem_id="split")
                            remove = gr.Button("remove selected", elem_id="remove")
                            clear_sel = gr.Button("clear selection")
                    with gr.Tab("paint", id="paint"):
                        gr.Markdown("Paint each instance in its own colour or layer; then **use painted masks**.")
                        editor = gr.ImageEditor(type="numpy", image_mode="RGBA", sources=(), transforms=(),
                                                brush=gr.Brush(colors=M.PALETTE, color_mode="fixed"),
                                                layers=gr.LayerOptions(layers=["instances"]), height=420,
                                                elem_id="editor")
                        use_paint = gr.Button("use painted masks", elem_id="use-paint")
                    with gr.Tab("upload", id="upload"):
                        gr.Markdown("A label map, one PNG per instance, a (K, H, W) `.npy` or a SAM / "
                                    "Grounded-SAM RLE `.json` - what `timi generate --masks` reads.")
                        files = gr.File(label="mask files", file_count="multiple", file_types=MASK_FILE_TYPES,
                                        elem_id="mask-files")
                        overlap = gr.Radio(["error", "first", "last"], value="error", label="overlapping masks")
                        use_files = gr.Button("use uploaded masks", elem_id="use-files")
                    with gr.Tab("SAM", id="sam", visible=cfg.sam is not None):
                        sam_mode = gr.Radio(["object point", "background point", "box corner"],
                                            value="object point", label="a click adds")
                        sam_view = gr.Image(label="click on the picture", interactive=False, elem_id="sam-view")
                        with gr.Row():
                            sam_add = gr.Button("add as instance", elem_id="sam-add")
                            sam_clear = gr.Button("clear prompts")
            with gr.Column(scale=1):
                masks_view = gr.Image(label="instance masks (click to select)", interactive=False,
                                      elem_id="masks-view", height=320)
                grid_view = gr.Image(label="masks on the condition tokens (timi inspect)", interactive=False,
                                     elem_id="grid-view")
                notes = gr.Textbox(label="masks", lines=3, interactive=False, elem_id="notes")
        with gr.Accordion("settings (timi generate's defaults: the paper's values, the gradient's common part removed; docs/results.md)", open=True):
            with gr.Row():
                timi = gr.Checkbox(d["timi"], label="TIMI guidance", elem_id="timi")
                compare = gr.Checkbox(False, label="also without TIMI, side by side", elem_id="compare")
                report = gr.Checkbox(True, label="report pictures", elem_id="report")
                seed = gr.Number(d["seed"], label="seed", precision=0, minimum=0, elem_id="seed")
            with gr.Row():
                steps = gr.Number(d["steps"], label=f"steps (at most {cfg.max_steps})", precision=0, minimum=1,
                                  maximum=cfg.max_steps, elem_id="steps")
                guidance_scale = gr.Number(d["guidance_scale"], label="guidance scale (CFG)")
                octree = gr.Number(d["octree_resolution"],
                                   label=f"octree resolution (at most {cfg.max_octree})", precision=0, minimum=8,
                                   maximum=cfg.max_octree, elem_id="octree")
            with gr.Row():
                alpha = gr.Number(d["alpha"], label="alpha (Eq.6)", elem_id="alpha")
                sigma = gr.Number(d["sigma"], label="sigma (Eq.5)")
                guided_layers = gr.Number(d["guided_layers"], label="guided layers", precision=0, minimum=1)
                # a text box: Gradio's number box shows (and sends) 0 for "empty", which would mean no guidance
                guided_steps = gr.Textbox("" if d["guided_steps"] is None else str(d["guided_steps"]),
                                          label=f"guided steps (at most {cfg.max_steps}; empty: the paper's first 30 % "
                                                "of the trajectory)", placeholder="the paper's first 30 %",
                                          max_lines=1, elem_id="guided-steps")
        with gr.Row():
            go = gr.Button("Run", variant="primary", elem_id="run", scale=4)
            stop_run = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
        status = gr.Textbox(label="status", interactive=False, lines=2, elem_id="status")
        with gr.Row():
            scene = gr.Model3D(label="TIMI: one colour per instance", elem_id="scene", height=420)
            base = gr.Model3D(label="without TIMI (same seed)", elem_id="base-scene", height=420)
        downloads = gr.File(label="downloads: the scene and each instance (GLB)", file_count="multiple",
                            interactive=False, elem_id="downloads")
        gallery = gr.Gallery(label="report", columns=3, height=520, object_fit="contain", elem_id="gallery")
        summary = gr.Textbox(label="run summary", lines=8, interactive=False, elem_id="summary")

        mask_outputs = [st, masks_view, grid_view, notes]

        def show(s, use_timi=True):
            overlay, grid, text, error = _views(s, cfg, use_timi)
            if s:
                s = {**s, "mask_error": error}
            return s, overlay, grid, text

        def on_picture(img, thr):
            if img is None:
                return None, None, None, "", None, None, ""
            folder = new_folder(cfg, "picture-")
            try:
                path = save_picture(img, folder)     # Gradio's file data: opened here, size checked first
                labels = M.propose_labels(np.asarray(Image.open(path).convert("RGBA")), colour_threshold=thr)
            except Exception as e:  # noqa: BLE001
                shutil.rmtree(folder, ignore_errors=True)
                line = page_error(e)
                return None, None, None, line, None, None, line
            s = {"picture": str(path), "folder": str(folder), "labels": labels,
                 "names": [f"object_{k + 1}" for k in range(int(labels.max()))], "selected": [], "points": [], "box": []}
            editor_value = {"background": str(path), "layers": [], "composite": None}
            return (*show(s), editor_value, str(path), "")

        picture.upload(on_picture, [picture, threshold], [*mask_outputs, editor, sam_view, status], preprocess=False)
        picture.clear(lambda: (None, None, None, "", None, None, ""), None, [*mask_outputs, editor, sam_view, status])

        def edit(fn):
            def handler(s, *args):
                if not s:
                    return None, None, None, "error: upload a picture first."
                try:
                    new = fn(s, *args)
                except Exception as e:  # noqa: BLE001
                    overlay, grid, _, _ = _views(s, cfg)
                    line = page_error(e)
                    return {**s, "mask_error": line}, overlay, grid, line
                if new is not None:
                    s = {**s, "names": M.carry_names(s["labels"], new[0], s["names"], new[1]), "labels": new[0],
                         "selected": []}
                return show(s)
            return handler

        def do_propose(s, thr):
            labels = M.propose_labels(_picture_array(s), colour_threshold=thr)
            return labels, "object"

        def do_merge(s):
            return M.merge_labels(s["labels"], s["selected"]), "object"

        def do_split(s):
            labels = s["labels"]
            for k in sorted(s["selected"], reverse=True):  # later labels first: earlier ids stay put
                labels = M.split_label(labels, k, _picture_array(s))
            return labels, "object"

        def do_remove(s):
            return M.remove_labels(s["labels"], s["selected"]), "object"

        def do_paint(s, value):
            layers = (value or {}).get("layers") or []
            labels = M.painted_labels(layers, s["labels"].shape)
            if labels.max() == 0:
                raise ValueError("nothing painted yet: paint each instance on the picture first.")
            return labels, "painted"

        def do_files(s, paths, mode):
            labels, names, _ = masks_from_files(Path(s["picture"]), paths or [], cfg, mode)
            s["names_from_files"] = names
            return labels, "file"

        propose.click(edit(do_propose), [st, threshold], mask_outputs, api_name="propose")
        merge.click(edit(do_merge), [st], mask_outputs)
        split.click(edit(do_split), [st], mask_outputs)
        remove.click(edit(do_remove), [st], mask_outputs)
        use_paint.click(edit(do_paint), [st, editor], mask_outputs)

        def on_files(s, paths, mode):
            out = edit(do_files)(s, paths, mode)
            s2 = out[0]
            if s2 and s2.get("names_from_files"):  # the files' own names (file stems, class names)
                s2 = {**s2, "names": s2.pop("names_from_files")}
                return show(s2)
            return out

        use_files.click(on_files, [st, files, overlap], mask_outputs)

        def on_select(s, evt: gr.SelectData):
            if not s:
                return s, None
            x, y = (int(v) for v in evt.index[:2])
            k = M.label_at(s["labels"], x, y)
            sel = list(s.get("selected", []))
            if k:
                sel = [i for i in sel if i != k] if k in sel else sel + [k]
            s = {**s, "selected": sel}
            return s, M.labels_overlay(_picture_array(s), s["labels"], sel)

        masks_view.select(on_select, [st], [st, masks_view])
        def on_clear_selection(s):
            if not s:
                return s, None
            return {**s, "selected": []}, M.labels_overlay(_picture_array(s), s["labels"], [])

        clear_sel.click(on_clear_selection, [st], [st, masks_view])

        if cfg.sam is not None:
            from .sam import add_instance

            def sam_preview(s, mask=None):
                img = _picture_array(s)
                lab = s["labels"] if mask is None else np.where(mask, s["labels"].max() + 1, s["labels"])
                view = M.labels_overlay(img, lab, [int(lab.max())] if mask is not None else [])
                for x, y, v in s["points"]:
                    view[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = (0, 200, 0) if v else (220, 0, 0)
                return view

            def on_sam_click(s, mode, evt: gr.SelectData):
                if not s:
                    return s, None, "error: upload a picture first."
                x, y = (int(v) for v in evt.index[:2])
                s = {**s, "points": list(s["points"]), "box": list(s["box"])}
                if mode == "box corner":
                    s["box"] = (s["box"] + [(x, y)])[-2:]
                else:
                    s["points"].append((x, y, 1 if mode == "object point" else 0))
                try:
                    box = None if len(s["box"]) < 2 else [min(s["box"][0][0], s["box"][1][0]), min(s["box"][0][1], s["box"][1][1]),
                                                          max(s["box"][0][0], s["box"][1][0]), max(s["box"][0][1], s["box"][1][1])]
                    if not s["points"] and box is None:
                        return s, sam_preview(s), "one more corner for the box."
                    mask = cfg.sam.mask(s["picture"], s["points"], box)
                    s["sam_mask"] = mask
                    return s, sam_preview(s, mask), f"SAM mask: {int(mask.sum())} pixels; add it as an instance."
                except Exception as e:  # noqa: BLE001
                    return s, sam_preview(s), page_error(e)

            def on_sam_add(s):
                if not s or s.get("sam_mask") is None:
                    return (*show(s), None) if s else (s, None, None, "error: upload a picture first.", None)
                labels = add_instance(s["labels"], s["sam_mask"])
                s = {**s, "names": M.carry_names(s["labels"], labels, s["names"], "sam"), "labels": labels,
                     "points": [], "box": [], "sam_mask": None, "selected": []}
                return (*show(s), sam_preview(s))

            def on_sam_clear(s):
                if not s:
                    return s, None
                s = {**s, "points": [], "box": [], "sam_mask": None}
                return s, sam_preview(s)

            sam_view.select(on_sam_click, [st, sam_mode], [st, sam_view, notes])
            sam_add.click(on_sam_add, [st], [*mask_outputs, sam_view])
            sam_clear.click(on_sam_clear, [st], [st, sam_view])

        run_inputs = [st, timi, compare, report, seed, steps, guidance_scale, octree, alpha, sigma, guided_layers,
                      guided_steps]

        async def on_run(s, use_timi, both, rep, seed_, steps_, cfg_scale, octree_, alpha_, sigma_, layers_, gsteps,
                         request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            empty = (None, None, None, None)
            if not s or s["labels"].max() == 0:
                return (*empty, "error: upload a picture and make its instance masks first.", "")
            if s.get("mask_error"):
                return (*empty, "error: the last mask step failed, so there is nothing checked to run: "
                        f"{s['mask_error'].removeprefix('error: ')} Fix the masks first.", "")
            params = dict(timi=use_timi, seed=seed_, steps=steps_, guidance_scale=cfg_scale, octree_resolution=octree_,
                          alpha=alpha_, sigma=sigma_, guided_layers=layers_, guided_steps=gsteps)
            stop = threading.Event()
            session = getattr(request, "session_hash", None)
            work = asyncio.ensure_future(asyncio.to_thread(
                run, Path(s["picture"]), s["labels"], s["names"], params, cfg, report=rep, compare=both,
                progress=lambda f, desc: progress(f, desc=desc), stop=stop))
            try:
                out = await finish(work, stop, lambda: client_gone(demo, session))
            except Exception as e:  # noqa: BLE001 - RunStopped too: the one line
                return (*empty, page_error(e), "")
            pics = [(str(p), c) for p, c in out.pictures + out.base_pictures]
            files = [str(out.scene)] + [str(p) for p in out.instances] + ([str(out.base_scene)] if out.base_scene else [])
            done = f"done: {len(out.instances)} instance file(s); the scene has one node per instance."
            return (str(out.scene), str(out.base_scene) if out.base_scene else None, files, pics or None, done,
                    "\n".join(for_page(line) for line in out.lines))

        running = go.click(on_run, run_inputs, [scene, base, downloads, gallery, status, summary],
                           concurrency_limit=1, concurrency_id=RUN_ID)
        stop_run.click(lambda: STOPPED_STATUS, None, [status], cancels=[running], queue=False)
        timi.change(lambda s, t: show(s, t), [st, timi], mask_outputs)
    return demo
