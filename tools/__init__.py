"""Tool-integrated reasoning steps (ToRA, Gou et al. 2023): the text format of a step that runs Python
(`tools.format`) and the sandbox that runs model-written programs (`tools.sandbox`).

No model code lives here: `policy/` calls these functions around its generation calls.
"""
