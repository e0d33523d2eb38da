"""Chat adapters: translate platform input into Jobs and render Events back.

``common`` holds what every platform shares; each platform lives in its own subpackage.
"""
