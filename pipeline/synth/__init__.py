"""Synthetic training lines and synthetic scanned documents with ground truth.

``lines`` (``write_line_set`` / ``iter_lines``) feeds recognizer training; ``docs`` (``write_document_set``) makes
test and demo documents for the whole pipeline. Both are deterministic for a seed on a given font install. The
package imports none of its modules: ``corpus`` alone (what eval and train configs check languages against) had
brought fonts, images and OpenCV with it.
"""
