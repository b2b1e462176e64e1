"""Reports people read (``kvferry report``): any bench's results -> one self-contained HTML page
and the same content as Markdown; ``--compare`` sets two runs side by side with a verdict per
case. :mod:`.model` is the document (sections of tables, figures and findings) that every part
builds and both renderers draw.
"""
