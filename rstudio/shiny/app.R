# The example Shiny app of the `shiny` purpose: written into a workspace's working folder
# when it holds no app of its own (`rstudio-pool example shiny`). An input and a reactive
# output, which go over Shiny's WebSocket.
library(shiny)

ui <- fluidPage(
  titlePanel("rstudio-pool: Shiny"),
  sliderInput("n", "Number of points", min = 1, max = 100, value = 10),
  textOutput("summary")
)

server <- function(input, output, session) {
  output$summary <- renderText(paste("The sum of 1 to", input$n, "is", sum(seq_len(input$n))))
}

shinyApp(ui, server)
